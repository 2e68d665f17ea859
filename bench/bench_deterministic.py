"""What `sglgym serve --deterministic` costs in throughput on CPU (tiny model, our chat route).

Starts a normal and a `--deterministic` server one after the other (each its own process group, stopped
by PID), sends the same rounds of N concurrent chat requests (max_tokens, ignore_eos, temperature 1.0,
a seed per request) to each: one warm-up round, then `--repetitions` timed rounds; output tokens/s is
the completion tokens of a round over its wall time; the median per mode and the ratio go to
bench/results/deterministic-cpu.json. On a shared machine wall time follows the other tenants' load, so
each round also records the CPU seconds of the server's processes (psutil: main, scheduler,
detokenizer), and the scheduler's CPU seconds per 1000 output tokens (where deterministic mode does its
extra work: seeded sampling, blocked matmuls) is reported next to tokens/s. `--cycles 2` runs
normal, deterministic, normal, deterministic (a fresh server each time) to expose drift.

    ./dev python bench/bench_deterministic.py [--concurrency 64] [--max-tokens 64] [--repetitions 3]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

from sglgym.bench.cpu import CpuMeter, ServerProcesses
from sglgym.bench.report import machine_info
from sglgym.models import build_tiny_model
from sglgym.procs import free_port, start_process, stop_process, wait_healthy

RESULTS = Path(__file__).resolve().parent / "results" / "deterministic-cpu.json"
MODES = {"normal": [], "deterministic": ["--deterministic"]}


def start(mode: str, model_path: str, max_total_tokens: int):
    port = free_port()
    cmd = [sys.executable, "-m", "sglgym.cli", "serve", "--model-path", model_path, "--port", str(port),
           "--tool-call-parser", "qwen25", "--served-model-name", "sglgym-tiny", "--log-level", "warning",
           "--max-total-tokens", str(max_total_tokens), *MODES[mode]]
    server = start_process(f"bench-{mode}", cmd, f"http://127.0.0.1:{port}")
    wait_healthy(server, 600)
    return server, cmd


def timed_round(server, n: int, max_tokens: int, round_: int) -> dict:
    meter = CpuMeter(ServerProcesses.find(server.pid))
    meter.start()
    result = asyncio.run(one_round(server.url, n, max_tokens, round_))
    cpu = meter.stop()
    result["cpu_s"] = {role: round(v, 3) for role, v in cpu.items()}
    if "scheduler" in cpu:
        result["scheduler_cpu_s_per_1k_tokens"] = round(1000 * cpu["scheduler"] / result["output_tokens"], 3)
    return result


async def one_round(url: str, n: int, max_tokens: int, round_: int) -> dict:
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def chat(i: int) -> int:
            body = {"model": "sglgym-tiny", "max_tokens": max_tokens, "ignore_eos": True, "temperature": 1.0,
                    "seed": 1000 * round_ + i,
                    "messages": [{"role": "user", "content": f"Request {i}: write a long story about robots."}]}
            r = await client.post("/v1/chat/completions", json=body)
            r.raise_for_status()
            return r.json()["usage"]["completion_tokens"]

        t0 = time.perf_counter()
        tokens = await asyncio.gather(*(chat(i) for i in range(n)))
        wall = time.perf_counter() - t0
    return {"wall_s": round(wall, 3), "output_tokens": sum(tokens),
            "output_tokens_per_s": round(sum(tokens) / wall, 1)}


def measure(mode: str, a, model_path: str) -> dict:
    server, cmd = start(mode, model_path, a.concurrency * (a.max_tokens + 64) * 2)
    try:
        load_before = list(os.getloadavg())
        warmup = timed_round(server, a.concurrency, a.max_tokens, 0)
        rounds = [timed_round(server, a.concurrency, a.max_tokens, r + 1) for r in range(a.repetitions)]
        assert all(r["output_tokens"] == a.concurrency * a.max_tokens for r in rounds), rounds
    finally:
        stop_process(server, grace_s=20)
    tps = [r["output_tokens_per_s"] for r in rounds]
    sched = [r["scheduler_cpu_s_per_1k_tokens"] for r in rounds if "scheduler_cpu_s_per_1k_tokens" in r]
    print(f"{mode:>13}: {statistics.median(tps):8.1f} output tok/s (rounds {tps}); scheduler CPU s per 1k tokens "
          f"{statistics.median(sched) if sched else None} (rounds {sched})", flush=True)
    return {"mode": mode, "command": cmd[2:], "warmup": warmup, "rounds": rounds,
            "median_output_tokens_per_s": statistics.median(tps),
            "median_scheduler_cpu_s_per_1k_tokens": statistics.median(sched) if sched else None,
            "load_average_before": load_before, "load_average_after": list(os.getloadavg())}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--concurrency", type=int, default=64)
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repetitions", type=int, default=3)
    p.add_argument("--cycles", type=int, default=1, help="normal then deterministic, this many times")
    p.add_argument("--out", type=Path, default=RESULTS)
    a = p.parse_args()
    model_path = str(build_tiny_model())
    started = datetime.datetime.now(datetime.timezone.utc)
    runs = [measure(mode, a, model_path) for _ in range(a.cycles) for mode in MODES]

    def pooled(mode: str, key: str) -> float | None:
        values = [r[key] for run in runs if run["mode"] == mode for r in run["rounds"] if key in r]
        return statistics.median(values) if values else None

    summary = {mode: {"median_output_tokens_per_s": pooled(mode, "output_tokens_per_s"),
                      "median_scheduler_cpu_s_per_1k_tokens": pooled(mode, "scheduler_cpu_s_per_1k_tokens")}
               for mode in MODES}
    ratio = summary["deterministic"]["median_output_tokens_per_s"] / summary["normal"]["median_output_tokens_per_s"]
    sched = [summary[m]["median_scheduler_cpu_s_per_1k_tokens"] for m in ("deterministic", "normal")]
    cpu_ratio = sched[0] / sched[1] if all(sched) else None
    print(f"output tok/s deterministic / normal = {ratio:.3f}; scheduler CPU per token deterministic / normal = "
          f"{cpu_ratio if cpu_ratio is None else round(cpu_ratio, 3)}")
    # each cycle's deterministic run against the normal run just before it (robust to slow drift in load)
    per_cycle = [round(runs[i + 1]["median_output_tokens_per_s"] / runs[i]["median_output_tokens_per_s"], 3)
                 for i in range(0, len(runs), 2)]
    print(f"per cycle (deterministic / normal tok/s): {per_cycle}")
    result = {
        "bench": "deterministic-cpu",
        "date": started.isoformat(timespec="seconds"),
        "machine": machine_info(),
        "config": {"concurrency": a.concurrency, "max_tokens": a.max_tokens, "ignore_eos": True,
                   "temperature": 1.0, "repetitions": a.repetitions, "route": "POST /v1/chat/completions",
                   "model": "embedded tiny Qwen2 (float32)"},
        "summary": summary,
        "ratio_deterministic_over_normal": round(ratio, 3),
        "scheduler_cpu_per_token_ratio_deterministic_over_normal": round(cpu_ratio, 3) if cpu_ratio else None,
        "ratio_per_cycle": per_cycle,
        "runs": runs,
        "load_average_end": list(os.getloadavg()),
    }
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
