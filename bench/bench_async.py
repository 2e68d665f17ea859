"""Synchronous vs asynchronous GRPO (`max_staleness` 0, 1, 2) on the embedded demo, one engine, the same
seeds and steps: seconds per GRPO step, the held-out reward before and after, and what the async runs
trained on (staleness, partial rollouts, dropped groups, the share of a step where generation and
training overlapped). Writes JSON with the machine.

    python bench/bench_async.py [--steps 40] [--ks 0,1,2] [--json bench/results/async-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PER_STEP = ("staleness_mean", "staleness_max", "partial_rollout_frac", "dropped_stale_frac", "overlap_frac",
            "tis_weight_mean", "token_mult_prob_error")


def _mean(lines: list[dict], key: str) -> float | None:
    values = [m[key] for m in lines if m.get(key) is not None]
    return round(statistics.fmean(values), 4) if values else None


def train_one(k: int, url: str, key: str, out: Path, steps: int, extra: list[str]) -> dict:
    from sglgym.trainer.cli import main as train

    t0 = time.perf_counter()
    summary = train(["--engine-url", url, "--api-key", key, "--out", str(out / f"k{k}"),
                     "--set", f"max_staleness={k}", "--set", f"steps={steps}", "--set", "time_budget_s=null",
                     "--set", "rollout_seed=7", *extra])
    wall = time.perf_counter() - t0
    lines = [json.loads(line) for line in (out / f"k{k}" / "metrics.jsonl").read_text().splitlines()]
    step_s = [m["step_s"] for m in lines]
    return {
        "max_staleness": k, "wall_s": round(wall, 1), "grpo_steps": len(lines),
        "grpo_s": round(sum(step_s), 1), "step_s_mean": round(statistics.fmean(step_s), 3),
        "step_s_median": round(statistics.median(step_s), 3),
        "train_s_mean": _mean(lines, "train_s"),
        "reward_before": summary["reward_before"], "reward_after": summary["reward_after"],
        "reward_gain": round(summary["reward_gain"], 4),
        "train_reward_last10": _mean(lines[-10:], "reward_mean"),
        **{f"{name}_mean": _mean(lines, name) for name in PER_STEP},
        "staleness_max": max((m.get("staleness_max", 0) for m in lines), default=0),
    }


def main(argv: list[str] | None = None) -> dict:
    from sglgym.rollout.engines import start_engine
    from sglgym.rollout.spinup import stop_process

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--ks", default="0,1,2")
    p.add_argument("--set", action="append", default=[], help="more config overrides, as for sglgym train")
    p.add_argument("--out", default=str(REPO / "runs" / "bench-async"))
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "async-cpu.json"))
    args = p.parse_args(argv)
    extra = [a for kv in args.set for a in ("--set", kv)]
    proc, url, key = start_engine("", 600.0)
    try:
        runs = [train_one(int(k), url, key, Path(args.out), args.steps, extra) for k in args.ks.split(",")]
    finally:
        stop_process(proc)
    sync = next((r for r in runs if r["max_staleness"] == 0), None)
    for r in runs:
        if sync is not None:
            r["step_s_vs_sync"] = round(r["step_s_mean"] / sync["step_s_mean"], 3)
    result = {"command": "python bench/bench_async.py " + " ".join(argv or sys.argv[1:]),
              "steps": args.steps, "overrides": args.set, "runs": runs, "machine": machine()}
    Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    for r in runs:
        print(json.dumps(r), flush=True)
    return result


if __name__ == "__main__":
    main()
