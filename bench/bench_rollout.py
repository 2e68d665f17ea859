"""Rollout throughput vs the raw engine at the same concurrency, on the single-turn `arithmetic` env.

Rollout side: the full loop (seed_session, chat route with carried ids, verify, packing) via
`collect_batch`. Raw side: SGLang's native `/generate` with the very prompt ids the rollouts used and the
same sampling seeds (the token counts still differ by a few percent: a seeded sample also depends on the
batch it ran in). Runs alternate and the engine's prefix cache
is flushed before each, so neither side inherits the other's cache. Writes JSON with a machine description.

    python bench/bench_rollout.py [--engine-url URL --api-key KEY] [--n 256 --concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import httpx

from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.rollout import EnvFleet, collect_batch, load_config, select
from sglgym.rollout.seeds import rollout_seed

REPO = Path(__file__).resolve().parents[1]


def machine() -> dict:
    cpu = ""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {"platform": platform.platform(), "python": platform.python_version(), "cpu": cpu,
            "cpus": os.cpu_count(), "mem_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}
    try:
        import torch
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        import sglang
        info["sglang"] = sglang.__version__
    except Exception:  # noqa: BLE001 - description only
        pass
    return info


async def flush(client: httpx.AsyncClient, url: str) -> None:
    await client.post(f"{url}/flush_cache", timeout=30)
    await asyncio.sleep(0.5)


async def raw_generate(url: str, headers: dict, jobs: list[tuple[list[int], int]], sampling: dict,
                       concurrency: int) -> tuple[float, int]:
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sem = asyncio.Semaphore(concurrency)
    async with httpx.AsyncClient(headers=headers, limits=limits, timeout=300) as c:
        await flush(c, url)

        async def one(ids, seed):
            async with sem:
                r = await c.post(f"{url}/generate", json={
                    "input_ids": ids, "return_logprob": True, "logprob_start_len": -1,
                    "sampling_params": {"temperature": sampling["temperature"], "top_p": sampling["top_p"],
                                        "max_new_tokens": sampling["max_tokens"], "sampling_seed": seed}})
                r.raise_for_status()
                return len(r.json()["meta_info"]["output_token_logprobs"])

        t0 = time.perf_counter()
        lens = await asyncio.gather(*[one(ids, seed) for ids, seed in jobs])
        return time.perf_counter() - t0, sum(lens)


async def rollout_run(fleet, url: str, key: str | None, rows, args, sampling) -> tuple[float, list]:
    async with httpx.AsyncClient(headers={"Authorization": f"Bearer {key}"} if key else {}) as c:
        await flush(c, url)
    t0 = time.perf_counter()
    samples, metrics = await collect_batch(fleet, [url], rows, group_size=args.group_size,
                                           batch_groups=len(rows), sampling=sampling, concurrency=args.concurrency,
                                           api_key=key, progress=False)
    wall = time.perf_counter() - t0
    if metrics["rollouts_failed"]:
        raise RuntimeError(f"rollouts failed: {metrics['failures'][:3]}")
    return wall, samples


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--engine-url", default=None)
    p.add_argument("--api-key", default=None)
    p.add_argument("--serve-args", default="")
    p.add_argument("--n", type=int, default=256, help="rollouts per run")
    p.add_argument("--group-size", type=int, default=4)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=None)
    args = p.parse_args(argv)
    sampling = {"temperature": 1.0, "top_p": 1.0, "max_tokens": args.max_tokens, "seed": 1234}

    server = None
    if args.engine_url:
        url, key = args.engine_url.rstrip("/"), args.api_key
    else:
        from sglgym.rollout.engines import start_engine
        server, url, key = start_engine(args.serve_args, 600)
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    try:
        with EnvFleet(select(load_config(DEFAULT_CONFIG), ["arithmetic"])) as fleet:
            rows = fleet["arithmetic"].dataset(args.n // args.group_size, seed=7)
            runs = []
            _, first = asyncio.run(rollout_run(fleet, url, key, rows, args, sampling))  # fixes the raw jobs
            jobs = [(s.token_ids[: s.prompt_len], rollout_seed(sampling["seed"], s.prompt_index, s.meta["sample_index"], 0))
                    for s in first]
            for r in range(args.repeats):
                # alternate which side goes first: a shared machine drifts
                if r % 2:
                    wall_raw, gen_raw = asyncio.run(raw_generate(url, headers, jobs, sampling, args.concurrency))
                wall_ro, samples = asyncio.run(rollout_run(fleet, url, key, rows, args, sampling))
                gen_ro = sum(s.num_generated for s in samples)
                if not r % 2:
                    wall_raw, gen_raw = asyncio.run(raw_generate(url, headers, jobs, sampling, args.concurrency))
                runs.append({"rollout_wall_s": wall_ro, "raw_wall_s": wall_raw, "samples": len(samples),
                             "rollout_gen_tokens": gen_ro, "raw_gen_tokens": gen_raw,
                             "rollout_samples_per_s": len(samples) / wall_ro, "raw_samples_per_s": len(jobs) / wall_raw,
                             "rollout_gen_tokens_per_s": gen_ro / wall_ro, "raw_gen_tokens_per_s": gen_raw / wall_raw})
                print(json.dumps(runs[-1]), file=sys.stderr)
    finally:
        if server is not None:
            from sglgym.rollout.spinup import stop_process
            stop_process(server)

    med = lambda k: statistics.median(r[k] for r in runs)  # noqa: E731
    result = {
        "benchmark": "rollout (arithmetic, single turn) vs raw /generate, same prompts, seeds, concurrency",
        "machine": machine(), "load_avg_1m": os.getloadavg()[0], "engine": "sglgym serve, tiny Qwen2 (random init), CPU engine" if server else url,
        "config": {"rollouts": args.n, "group_size": args.group_size, "concurrency": args.concurrency,
                   "max_tokens": args.max_tokens, "repeats": args.repeats},
        "median": {k: med(k) for k in runs[0] if k.endswith("_per_s")},
        "ratio_samples_per_s": med("rollout_samples_per_s") / med("raw_samples_per_s"),
        "ratio_gen_tokens_per_s": med("rollout_gen_tokens_per_s") / med("raw_gen_tokens_per_s"),
        "same_generated_tokens": all(r["rollout_gen_tokens"] == r["raw_gen_tokens"] for r in runs),
        "runs": runs,
    }
    print(json.dumps(result, indent=2))
    out = args.out or REPO / "bench" / "results" / f"rollout-{'gpu' if result['machine'].get('gpu') else 'cpu'}.json"
    Path(out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
