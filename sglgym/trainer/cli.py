"""`sglgym train`: GRPO on a built-in environment against a running (or self-started) SGLang engine.

With no arguments it is the embedded default job: the tiny model, the `arithmetic` environment, a short
supervised warm-up so the random model has reward signal, then GRPO until the time budget; it prints
the held-out reward before and after and writes metrics.jsonl, summary.json and reward.png.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .config import dump, load_train_config


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sglgym train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="YAML with TrainConfig fields (see sglgym/trainer/config.py)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set steps=5 --set loss.eps_high=0.28 (repeatable)")
    p.add_argument("--engine-url", default=None, help="use a running `sglgym serve` instead of starting one")
    p.add_argument("--api-key", default=None, help="its API key")
    p.add_argument("--out", default=None, help="output directory (default: the config's out_dir)")
    p.add_argument("--engine-start-timeout", type=float, default=600.0)
    return p


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    overrides = list(args.overrides)
    if args.engine_url:
        overrides += [f"engine_url={args.engine_url}"]
    if args.api_key:
        overrides += [f"engine_api_key={args.api_key}"]
    if args.out:
        overrides += [f"out_dir={args.out}"]
    try:
        cfg = load_train_config(args.config, overrides)
    except (ValueError, TypeError) as e:
        print(f"sglgym train: bad config: {e}", file=sys.stderr)
        sys.exit(2)

    from transformers import AutoTokenizer

    from sglgym.models import build_tiny_model
    from sglgym.rollout.cli import start_engine
    from sglgym.rollout.config import load_config, select
    from sglgym.rollout.spinup import EnvFleet, stop_process

    from .grpo import GRPOTrainer
    from .plot import plot_metrics
    from .policy import HFPolicy, OptimConfig
    from .refit import EngineControl

    model_path = cfg.model_path or str(build_tiny_model())
    Path(cfg.out_dir).mkdir(parents=True, exist_ok=True)
    (Path(cfg.out_dir) / "config.yaml").write_text(dump(cfg))
    try:
        env_configs = select(load_config(cfg.env_config, cfg.env_set), list(cfg.env_weights()))
    except (KeyError, ValueError) as e:
        print(f"sglgym train: bad env selection: {e}", file=sys.stderr)
        sys.exit(2)

    engine_server = None
    try:
        if cfg.engine_url:
            engine = EngineControl(cfg.engine_url, cfg.engine_api_key)
        else:
            serve_args = f"--model-path {model_path} {cfg.serve_args}"
            if not cfg.model_path:
                serve_args += " --tool-call-parser qwen25 --served-model-name sglgym-tiny"
            engine_server, url, key = start_engine(serve_args, args.engine_start_timeout)
            engine = EngineControl(url, key)
        policy = HFPolicy(model_path, OptimConfig(lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip),
                          seed=cfg.seed)
        tokenizer = AutoTokenizer.from_pretrained(model_path)
        # NeMo Gym envs run their own model server against the engine: it needs the URL and key
        with EnvFleet(env_configs, engine_urls=[engine.base_url], api_key=engine.api_key) as fleet:
            trainer = GRPOTrainer(cfg, policy, engine, fleet, tokenizer)
            summary = trainer.run()
    finally:
        if engine_server is not None:
            stop_process(engine_server)

    png = plot_metrics(Path(cfg.out_dir) / "metrics.jsonl", Path(cfg.out_dir) / "reward.png", summary)
    print(f"\n[train] held-out reward: before {summary['reward_before']:.3f} -> after {summary['reward_after']:.3f} "
          f"({summary['reward_gain']:+.3f}) in {summary['grpo_steps']} GRPO steps, {summary['total_s']:.0f}s total")
    if len(summary["reward_after_per_env"]) > 1:
        for env, after in summary["reward_after_per_env"].items():
            print(f"[train]   {env}: {summary['reward_before_per_env'][env]:.3f} -> {after:.3f}")
    print(f"[train] wrote {cfg.out_dir}/metrics.jsonl, summary.json, {png.name}")
    return summary
