"""A 2-step `sglgym train` on each NeMo Gym environment in the built-in envs.yaml, against one engine.

Shows that each env's pipeline runs end to end offline on CPU: NeMo Gym's own agent, model server and
resources server; rows from its JSONL; the ids its model server carried (contiguity is checked per turn:
a broken sequence is a failed rollout); two GRPO steps, refit and probe. The tiny model's reward may stay
near 0. Writes JSON with the machine.

    python bench/train_nemo_gym_envs.py [--envs nemo_gym_math,nemo_gym_mcqa] [--steps 2]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ENVS = ["nemo_gym_weather", "nemo_gym_multi_turn", "nemo_gym_math", "nemo_gym_mcqa", "nemo_gym_xlam", "nemo_gym_blackjack"]


def train_one(env: str, url: str, key: str, out: Path, steps: int) -> dict:
    from sglgym.trainer.cli import main as train

    t0 = time.perf_counter()
    summary = train([
        "--engine-url", url, "--api-key", key, "--out", str(out / env), "--set", f"env={env}",
        "--set", f"steps={steps}", "--set", "sft_steps=0", "--set", "group_size=2", "--set", "batch_groups=2",
        "--set", "dynamic_sampling=false", "--set", "eval_rows=2", "--set", "eval_samples=1",
        "--set", "probe_every=1", "--set", "time_budget_s=null", "--set", "max_tokens=24",
    ])
    lines = [json.loads(l) for l in (out / env / "metrics.jsonl").read_text().splitlines()]
    return {
        "steps": [m["step"] for m in lines],
        "samples": [m.get(f"samples/{env}") for m in lines],
        "rollout_failures": [m["rollout_failures"] for m in lines],
        "reward_mean": [m["reward_mean"] for m in lines],
        "probe_ok": [m.get("probe_ok") for m in lines],
        "probe_max_abs_diff": [m.get("probe_max_abs_diff") for m in lines],
        "token_mult_prob_error": [m.get("token_mult_prob_error") for m in lines],
        "turns_mean": [m.get(f"turns_mean/{env}") for m in lines],
        "failures_by_stage": [m.get("rollout_failures_by_stage", {}) for m in lines],
        "reward_before": summary["reward_before"], "reward_after": summary["reward_after"],
        "wall_s": round(time.perf_counter() - t0, 1),
    }


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--envs", default=",".join(ENVS))
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--context-length", type=int, default=8192,
                   help="engine context: some example rows (xlam's tool lists) exceed the tiny model's 2048")
    p.add_argument("--out", default=str(REPO / "runs" / "nemo-gym-envs"))
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "nemo-gym-train-cpu.json"))
    args = p.parse_args(argv)

    from sglgym.models import build_tiny_model
    from sglgym.rollout.engines import start_engine
    from sglgym.rollout.spinup import stop_process

    import os
    os.environ["SGLANG_ALLOW_OVERWRITE_LONGER_CONTEXT_LEN"] = "1"  # beyond the config's 2048 (rotary extends)
    serve = (f"--model-path {build_tiny_model()} --tool-call-parser qwen25 --served-model-name sglgym-tiny "
             f"--context-length {args.context_length}")
    proc, url, key = start_engine(serve, 600.0)
    results: dict = {}
    try:
        for env in args.envs.split(","):
            try:
                results[env] = train_one(env, url, key, Path(args.out), args.steps)
            except (Exception, SystemExit) as e:  # one env's failure is a result, not the end of the run
                results[env] = {"error": f"{type(e).__name__}: {e}"}
            print(f"[bench] {env}: {json.dumps(results[env])}", flush=True)
    finally:
        stop_process(proc)
    report = {"machine": machine(), "steps": args.steps, "engine_context_length": args.context_length, "envs": results,
              "ok": all("error" not in r and not any(r["rollout_failures"]) and all(r["probe_ok"])
                        for r in results.values())}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {args.json} (all ok: {report['ok']})")
    return report


if __name__ == "__main__":
    main()
