"""`sglgym rollout`: spin up the chosen environments, collect one batch of grouped rollouts, write samples.

    sglgym rollout --config sglgym/rollout/envs.yaml --env guess --group-size 4 --batch-groups 8 \
        [--engine-url URL ...] [--set guess.params.high=50] --out rollouts/samples.jsonl

Without --engine-url it starts `sglgym serve` (the tiny model by default; --serve-args to change) and
stops it at the end, like the environment servers.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .collector import collect_batch_sync
from .config import load_config, select
from .engines import EnginePool, start_engine
from .samples import write_jsonl
from .spinup import EnvFleet, stop_process


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglgym rollout", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML env config (default: the built-in envs)")
    p.add_argument("--env", action="append", default=[], help="env(s) to run; repeat or comma-separate")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value, e.g. guess.params.high=50 or guess.agent.max_turns=4")
    p.add_argument("--engine-url", nargs="+", default=[], help="engine base URL(s); several = DP replicas")
    p.add_argument("--router", action="store_true", help="the single --engine-url is an sglang-router: rollouts are pinned to its healthy workers")
    p.add_argument("--api-key", default=None, help="engine API key (sent as Authorization: Bearer)")
    p.add_argument("--model", default="default", help="model name sent in requests")
    p.add_argument("--serve-args", default="", help="extra `sglgym serve` args when starting an engine")
    p.add_argument("--engine-start-timeout", type=float, default=600.0)
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--batch-groups", type=int, default=8)
    p.add_argument("--num-prompts", type=int, default=None,
                   help="dataset rows available per env (default: 4 x batch groups)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--max-tokens", type=int, default=64, help="per turn")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (reproducible samples)")
    p.add_argument("--data-seed", type=int, default=None, help="dataset seed (default: from the config)")
    p.add_argument("--split", default="train")
    p.add_argument("--dynamic-sampling", action="store_true", help="drop groups whose rewards are all equal")
    p.add_argument("--oversample", type=float, default=1.5)
    p.add_argument("--engine-timeout", type=float, default=120.0, help="per engine request, seconds")
    p.add_argument("--rollout-timeout", type=float, default=600.0, help="per rollout, seconds")
    p.add_argument("--retries", type=int, default=2)
    p.add_argument("--out", default="rollouts/samples.jsonl", help="training samples of the batch")
    p.add_argument("--log", default=None, help="every rollout and failure as it finishes "
                                               "(default: OUT with .rollouts.jsonl)")
    p.add_argument("--metrics-out", default=None, help="write the batch metrics JSON here too")
    p.add_argument("--write-datasets", default=None, metavar="DIR",
                   help="write each env's dataset rows as NeMo Gym JSONL into DIR and exit")
    p.add_argument("--no-progress", action="store_true")
    return p


def _interleave(lists: list[list[dict]]) -> list[dict]:
    out = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)]
    return out


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.router and not args.engine_url:
        parser.error("--router needs --engine-url ROUTER_URL (the sglang-router to read the workers from)")
    configs = select(load_config(args.config, args.overrides), args.env)
    n_rows = args.num_prompts or 4 * args.batch_groups

    if args.write_datasets:   # generators run in this process: no server needed
        from .env import Env
        for cfg in configs.values():
            path = Env(cfg, "").write_dataset(Path(args.write_datasets) / f"{cfg.name}.{args.split}.jsonl",
                                              n_rows, args.data_seed, args.split)
            print(path)
        return

    engine_server = None
    try:
        if args.engine_url:
            urls, key = args.engine_url, args.api_key
        else:
            engine_server, url, key = start_engine(args.serve_args, args.engine_start_timeout)
            urls = [url]
        pool = EnginePool.from_router(urls[0], api_key=key, model=args.model) if args.router \
            else EnginePool(urls, api_key=key, model=args.model)
        # NeMo Gym envs call the replicas themselves (never through the router: it drops the carried ids)
        with EnvFleet(configs, engine_urls=pool.urls, api_key=key) as fleet:
            rows = _interleave([env.dataset(n_rows, args.data_seed, args.split) for env in fleet])
            sampling = {"temperature": args.temperature, "top_p": args.top_p, "max_tokens": args.max_tokens}
            if args.seed is not None:
                sampling["seed"] = args.seed
            log = args.log or str(Path(args.out).with_suffix("")) + ".rollouts.jsonl"
            samples, metrics = collect_batch_sync(
                fleet, pool, rows, group_size=args.group_size, batch_groups=args.batch_groups,
                sampling=sampling, concurrency=args.concurrency, dynamic_sampling=args.dynamic_sampling,
                oversample=args.oversample, api_key=key,
                engine_timeout_s=args.engine_timeout, rollout_timeout_s=args.rollout_timeout,
                retries=args.retries, jsonl_path=log, progress=not args.no_progress)
    finally:
        if engine_server is not None:
            stop_process(engine_server)
    write_jsonl(samples, args.out)
    failures = metrics.pop("failures")
    for f in failures[:20]:
        print(f"[rollout] FAILED env={f['env']} group={f['group_id']} sample={f['sample_index']} "
              f"stage={f['stage']}: {f['error'][:300]}", file=sys.stderr)
    if args.metrics_out:
        Path(args.metrics_out).write_text(json.dumps({**metrics, "failures": failures}, indent=2))
    print(json.dumps({**metrics, "out": args.out, "log": log}, indent=2))
    if not metrics["batch_full"]:
        print(f"[rollout] batch not full: {metrics['groups']}/{args.batch_groups} groups", file=sys.stderr)
        sys.exit(1)
