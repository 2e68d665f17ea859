"""`sglgym train`: GRPO on a built-in environment against a running (or self-started) SGLang engine.

With no arguments it is the embedded default job: the tiny model, the `arithmetic` environment, a short
supervised warm-up so the random model has reward signal, then GRPO until the time budget; it prints
the held-out reward before and after and writes metrics.jsonl, summary.json and reward.png.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .config import TrainConfig, dump, load_train_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglgym train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML with TrainConfig fields (see sglgym/trainer/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set steps=5 --set loss.eps_high=0.28 (repeatable)")
    p.add_argument("--engine-url", action="append", default=[],
                   help="use a running `sglgym serve` instead of starting one (repeat for several replicas)")
    p.add_argument("--api-key", default=None, help="its API key")
    p.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    p.add_argument("--engine-start-timeout", type=float, default=600.0)
    p.add_argument("--resume", metavar="OUT", default=None,
                   help="continue the run in OUT from its last checkpoint, with its config (plus any --set); a run "
                        "whose OUT already holds checkpoints of an unfinished run resumes by itself")
    p.add_argument("--force", action="store_true",
                   help="resume even when the config differs from the checkpoint's in keys that change what is trained")
    p.add_argument("--nproc", type=int, default=None,
                   help="run under torchrun with this many trainer ranks on this machine (backend fsdp); for "
                        "several nodes call torchrun yourself: torchrun --nnodes ... -m sglgym.cli train ...")
    return p


def relaunch_under_torchrun(argv: list[str], nproc: int) -> int:
    """`sglgym train --nproc N ...` = `torchrun --standalone --nproc-per-node N -m sglgym.cli train ...`."""
    import subprocess

    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "sglgym.cli", "train", *rest]
    env = {**os.environ}
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    print(f"[train] {' '.join(cmd)}", flush=True)
    return subprocess.call(cmd, env=env)


def load(args) -> TrainConfig:
    overrides, base = list(args.overrides), None
    if args.resume and not args.config:  # the run's own config; --set may change what may change
        from .checkpoint import latest_checkpoint, read_trainer_state
        last = latest_checkpoint(Path(args.resume))
        if last is None:
            print(f"sglgym train: --resume {args.resume}: no checkpoint in {args.resume}/checkpoints", file=sys.stderr)
            sys.exit(2)
        base = read_trainer_state(last)["config"]
    try:
        cfg = load_train_config(args.config, overrides, base=base)
    except (ValueError, TypeError) as e:
        print(f"sglgym train: bad config: {e}", file=sys.stderr)
        sys.exit(2)
    # flags set fields as given: never through YAML (an API key of digits stays a string)
    if len(args.engine_url) == 1 and not cfg.engine_urls:
        cfg.engine_url = args.engine_url[0]
    elif args.engine_url:
        cfg.engine_url, cfg.engine_urls = None, list(args.engine_url)
    if args.api_key is not None:
        cfg.engine_api_key = args.api_key
    if args.out is not None:
        cfg.out_dir = args.out
    if args.resume:
        cfg.out_dir = args.resume
    return cfg


def make_policy(cfg: TrainConfig, model_path: str, ranks):
    from .policy import HFPolicy, OptimConfig

    optim = OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip)
    if cfg.backend == "megatron":
        if ranks.world_size % cfg.megatron.tp:
            print(f"sglgym train: megatron.tp={cfg.megatron.tp} does not divide {ranks.world_size} ranks", file=sys.stderr)
            sys.exit(2)
        from .megatron_policy import MegatronPolicy
        ranks.tp = cfg.megatron.tp
        return MegatronPolicy(model_path, optim, ranks=ranks, tp=cfg.megatron.tp, seed=cfg.seed,
                              activation_checkpointing=cfg.activation_checkpointing)
    if cfg.backend == "fsdp":
        from .fsdp import FSDPPolicy
        return FSDPPolicy(model_path, optim, seed=cfg.seed, ranks=ranks,
                          activation_checkpointing=cfg.activation_checkpointing,
                          reshard_after_forward=cfg.fsdp.reshard_after_forward)
    if ranks.world_size > 1:
        print("sglgym train: backend hf is one process; use --set backend=fsdp with several ranks", file=sys.stderr)
        sys.exit(2)
    return HFPolicy(model_path, optim, seed=cfg.seed, ranks=ranks, activation_checkpointing=cfg.activation_checkpointing)


def main(argv: list[str] | None = None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
    cfg = load(args)
    if cfg.backend == "megatron":
        import torch
        if not torch.cuda.is_available():
            print("sglgym train: backend megatron needs CUDA (megatron-core assumes it); on CPU its math is proven "
                  "by tests/test_trainer_megatron.py. Use backend hf or fsdp here.", file=sys.stderr)
            sys.exit(2)
    if "RANK" not in os.environ and ((args.nproc or 1) > 1 or cfg.backend in ("fsdp", "megatron")):
        sys.exit(relaunch_under_torchrun(argv, args.nproc or 1))  # FSDP needs a process group, even of one

    from .ranks import close_ranks, init_ranks

    from .recovery import EngineLost

    ranks = init_ranks(cfg.dist_timeout_s)
    try:
        resume_from = ranks.broadcast(resume_point(cfg, bool(args.resume), args.force) if ranks.main else None)
        return _train(cfg, ranks, args.engine_start_timeout, resume_from)
    except EngineLost as e:
        print(f"sglgym train: {e}", file=sys.stderr)
        sys.exit(3)
    finally:
        close_ranks(ranks)


def resume_point(cfg: TrainConfig, explicit: bool, force: bool) -> Path | None:
    """The checkpoint this run continues from, or None for a new run (which clears the old run's
    checkpoints and summary from OUT). Exits with a message when the config changed or nothing is left."""
    from .checkpoint import latest_checkpoint, read_trainer_state
    from .config import config_diff

    out = Path(cfg.out_dir)
    last = latest_checkpoint(out)
    finished = (out / "summary.json").exists()  # written at the end of a run; a new run removes it
    if last is None or (finished and not explicit):
        _clear_run(out)
        return None
    state = read_trainer_state(last)
    differ = config_diff(state["config"], cfg)
    if differ and not force:
        print(f"sglgym train: {out} holds checkpoints of a run with another config ({', '.join(differ)} differ); "
              f"use --force to resume anyway, or another --out", file=sys.stderr)
        sys.exit(2)
    if state["step"] >= cfg.steps:
        print(f"sglgym train: {last} is step {state['step']} of steps={cfg.steps}: nothing left; raise steps "
              f"(--set steps=N) to train further", file=sys.stderr)
        sys.exit(2)
    print(f"[train] resuming {out} from {last.name}" + (f" (changed: {', '.join(differ)})" if differ else ""), flush=True)
    return last


def _clear_run(out: Path) -> None:
    import shutil

    shutil.rmtree(out / "checkpoints", ignore_errors=True)
    (out / "summary.json").unlink(missing_ok=True)


def _train(cfg: TrainConfig, ranks, engine_start_timeout: float, resume_from: Path | None = None) -> dict:
    from transformers import AutoTokenizer

    from sglgym.models import build_tiny_model

    model_path = (cfg.model_path or str(build_tiny_model())) if ranks.main else None
    model_path = ranks.broadcast(model_path)  # rank 0 builds the tiny model once; the others wait for it
    if not ranks.main:
        policy = make_policy(cfg, model_path, ranks)
        return _run(cfg, ranks, policy, engines=[], fleet=None, tokenizer=None, resume_from=resume_from)
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "config.yaml").write_text(dump(cfg))
    from sglgym.rollout.config import load_config, select
    from sglgym.rollout.engines import start_engine
    from sglgym.rollout.spinup import EnvFleet, stop_process

    from .recovery import Recovery
    from .refit import EngineControl

    try:
        env_configs = select(load_config(cfg.env_config, cfg.env_set), list(cfg.env_weights()))
    except (KeyError, ValueError) as e:
        print(f"sglgym train: bad env selection: {e}", file=sys.stderr)
        sys.exit(2)
    recovery, engine_server = None, None
    try:
        urls, serve_args = cfg.engines(), ""
        if not urls:
            serve_args = f"--model-path {model_path} {cfg.serve_args}"
            if not cfg.model_path:
                serve_args += " --tool-call-parser qwen25 --served-model-name sglgym-tiny"
            engine_server, url, cfg.engine_api_key = start_engine(serve_args, engine_start_timeout)
            urls = [url]
        engines = [EngineControl(u, cfg.engine_api_key, timeout_s=cfg.refit_timeout_s) for u in urls]
        policy = make_policy(cfg, model_path, ranks)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        # NeMo Gym envs run their own model server against the engines: they need the URLs and key
        with EnvFleet(env_configs, engine_urls=urls, api_key=cfg.engine_api_key) as fleet:
            recovery = Recovery(urls, cfg.engine_api_key, fleet, engine_server, serve_args, engine_start_timeout,
                                cfg.engine_wait_s)
            summary = _run(cfg, ranks, policy, engines, fleet, tokenizer, resume_from, recovery)
    finally:
        server = recovery.engine_server if recovery is not None else engine_server  # restarts replace it
        if server is not None:
            stop_process(server)
    _report(cfg, summary)
    return summary


def _run(cfg: TrainConfig, ranks, policy, engines, fleet, tokenizer, resume_from: Path | None = None,
         recovery=None) -> dict:
    from .grpo import GRPOTrainer
    from .refitter import Refitter
    from .rollouts import Rollouts

    rollouts = Rollouts(cfg, fleet, [e.base_url for e in engines], cfg.engine_api_key, Path(cfg.out_dir),
                        recovery) if ranks.main else None
    refitter = Refitter(cfg.refit, policy, ranks, engines, Path(cfg.out_dir))
    if ranks.main and recovery is not None:
        refitter.recover = recovery.after_failures
    return GRPOTrainer(cfg, policy, ranks, refitter, rollouts, tokenizer, resume_from).run()


def _report(cfg: TrainConfig, summary: dict) -> None:
    from .plot import plot_metrics

    png = plot_metrics(Path(cfg.out_dir) / "metrics.jsonl", Path(cfg.out_dir) / "reward.png", summary)
    print(f"\n[train] held-out reward: before {summary['reward_before']:.3f} -> after {summary['reward_after']:.3f} "
          f"({summary['reward_gain']:+.3f}) in {summary['grpo_steps']} GRPO steps, {summary['total_s']:.0f}s total")
    if len(summary["reward_after_per_env"]) > 1:
        for env, after in summary["reward_after_per_env"].items():
            print(f"[train]   {env}: {summary['reward_before_per_env'][env]:.3f} -> {after:.3f}")
    print(f"[train] wrote {cfg.out_dir}/metrics.jsonl, summary.json, {png.name}")
