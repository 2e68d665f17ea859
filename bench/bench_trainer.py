"""Trainer backends on this machine: GRPO update steps/s and tokens/s for `hf` (1 process) and `fsdp` at 1 and
2 torchrun ranks, the time to gather the full weights, and refit seconds / GB/s into a live engine for
each refit path. Model: a locally built Qwen2 (hidden 256, 4 layers) so the work is not all overhead.
Writes JSON with the machine.

    python bench/bench_trainer.py [--json bench/results/trainer-cpu.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_rollout import machine  # noqa: E402

from sglgym.models import TinyModelSpec, build_tiny_model  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
SPEC = TinyModelSpec(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4, intermediate_size=768)


def run_ranks(model: str, backend: str, nproc: int, extra: list[str]) -> dict:
    threads = max(1, (os.cpu_count() or 1) // nproc)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           str(REPO / "bench" / "trainer_ranks.py"), "--model", model, "--backend", backend, *extra]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    if r.returncode != 0:
        return {"backend": backend, "ranks": nproc, "error": r.stderr[-2000:]}
    return json.loads([line for line in r.stdout.splitlines() if line.startswith("{")][-1])


def refit_paths(model: str) -> dict:
    from sglgym.rollout.engines import start_engine
    from sglgym.rollout.spinup import stop_process
    from sglgym.trainer.policy import HFPolicy
    from sglgym.trainer.ranks import Ranks
    from sglgym.trainer.refit import EngineControl
    from sglgym.trainer.refitter import Refitter

    proc, url, key = start_engine(f"--model-path {model}", 600.0)
    out = {}
    try:
        policy = HFPolicy(model)
        engine = EngineControl(url, key)
        for path in ("tensor", "disk", "distributed"):
            refitter = Refitter(path, policy, Ranks(), [engine], REPO / "runs" / "bench-refit")
            refitter.refit()  # first refit sets up (distributed: the group)
            runs = [refitter.refit() for _ in range(3)]
            probe = refitter.check_agreement([[1, 5, 9, 13, 17, 21, 25, 29]])
            refitter.close()
            best = min(runs, key=lambda r: r["refit_s"])
            out[path] = {**best, "probe_max_abs_diff": probe["probe_max_abs_diff"]}
            print(f"[bench] refit {path}: {out[path]}", flush=True)
    finally:
        stop_process(proc)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default=str(REPO / "bench" / "results" / "trainer-cpu.json"))
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--steps", type=int, default=3)
    args = p.parse_args(argv)
    model = str(build_tiny_model(spec=SPEC))
    extra = ["--samples", str(args.samples), "--steps", str(args.steps)]
    backends = []
    for backend, nproc in (("hf", 1), ("fsdp", 1), ("fsdp", 2)):
        backends.append(run_ranks(model, backend, nproc, extra))
        print(f"[bench] {backends[-1]}", flush=True)
    report = {"machine": machine(), "model": {"hidden": SPEC.hidden_size, "layers": SPEC.num_layers},
              "batch": {"samples": args.samples, "prompt_tokens": 64, "gen_tokens": 64}, "backends": backends,
              "refit": refit_paths(model)}
    Path(args.json).write_text(json.dumps(report, indent=2) + "\n")
    print(f"[bench] wrote {args.json}")
    return report


if __name__ == "__main__":
    main()
