"""Machine description, terminal table and plot for `sglgym bench`."""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
from importlib import metadata
from pathlib import Path

from .client import ROUTE_LABELS, ROUTES

# The checkout the bench runs in (its git commit goes into the JSON); the working directory when the
# package is installed elsewhere.
REPO = Path(__file__).resolve().parents[2] if (Path(__file__).resolve().parents[2] / ".git").exists() \
    else Path.cwd()


def _run(cmd: list[str]) -> str | None:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() if out.returncode == 0 else None


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def gpu_names() -> list[str]:
    if not shutil.which("nvidia-smi"):
        return []
    out = _run(["nvidia-smi", "--query-gpu=name,memory.total", "--format=csv,noheader"])
    return [line.strip() for line in out.splitlines() if line.strip()] if out else []


def machine_info() -> dict:
    """Where the bench ran (the client; with loopback targets, also the server)."""
    status = _run(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": _memory_gb(),
        "gpus": gpu_names(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": _version("torch"),
        "sglang": _version("sglang"),
        "httpx": _version("httpx"),
        "git_commit": _run(["git", "-C", str(REPO), "rev-parse", "HEAD"]),
        "git_dirty": bool(status) if status is not None else None,
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "env": {k: os.environ[k] for k in ("OMP_NUM_THREADS", "CUDA_VISIBLE_DEVICES") if k in os.environ},
    }


def _memory_gb() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def device_tag(info: dict) -> str:
    return "gpu" if info["gpus"] else "cpu"


# --- terminal ---------------------------------------------------------------------------------
def _fmt(x, spec: str = ".0f") -> str:
    return "-" if x is None else format(x, spec)


def format_table(levels: list[dict], ratios: list[dict]) -> str:
    by = {(lv["route"], lv["concurrency"]): lv for lv in levels}
    ratio = {r["concurrency"]: r for r in ratios}
    head = (f"{'conc':>5} | {'(a) tok/s':>9} {'(b) tok/s':>9} {'(c) tok/s':>9} {'(d) tok/s':>9} | {'a/b':>5} "
            f"{'a/c':>5} {'d/a':>5} | {'best a/b':>8} {'a/c':>5} | {'p50 ms a/b/c/d':>20} | {'p99 ms a/b/c/d':>20} | "
            f"{'tok/req a/b/c/d':>18} | "
            f"{'srv CPU ms/req':>15} | err")
    lines = [head, "-" * len(head)]
    for c in sorted(ratio):
        row = [by.get((route, c)) for route in ROUTES]
        if any(r is None for r in row):
            continue
        r = ratio[c]
        tps = " ".join(f"{lv['tokens_per_s']:>9.1f}" for lv in row)
        p50 = "/".join(_fmt(lv["p50_ms"]) for lv in row)
        p99 = "/".join(_fmt(lv["p99_ms"]) for lv in row)
        tpr = "/".join(_fmt(lv["mean_output_tokens"], ".1f") for lv in row)
        cpu = "/".join(_fmt(lv["cpu_ms_per_request"].get("main"), ".2f") for lv in row)
        errors = sum(lv["errors"] for lv in row)
        lines.append(f"{c:>5} | {tps} | {_fmt(r['a_over_b'], '.3f'):>5} {_fmt(r['a_over_c'], '.3f'):>5} "
                     f"{_fmt(r['d_over_a'], '.3f'):>5} | {_fmt(r['a_over_b_best'], '.3f'):>8} "
                     f"{_fmt(r['a_over_c_best'], '.3f'):>5} | {p50:>20} | {p99:>20} | {tpr:>18} | {cpu:>15} | {errors}")
    lines.append("routes: " + "; ".join(ROUTE_LABELS[r] for r in ROUTES))
    lines.append("tok/s: output tokens per second, median over repetitions (best: ratio of each route's best round); "
                 "p50/p99: request latency;")
    lines.append("srv CPU: CPU ms per request in the server's HTTP/tokenizer process, where the routes run "
                 "(servers on this machine only)")
    return "\n".join(lines)


# --- plot -------------------------------------------------------------------------------------
def plot(levels: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_tp, ax_lat) = plt.subplots(1, 2, figsize=(12, 4.6))
    for route in ROUTES:
        rows = sorted((lv for lv in levels if lv["route"] == route), key=lambda lv: lv["concurrency"])
        if not rows:
            continue
        xs = [lv["concurrency"] for lv in rows]
        line, = ax_tp.plot(xs, [lv["tokens_per_s"] for lv in rows], marker="o", label=ROUTE_LABELS[route])
        color = line.get_color()
        ax_lat.plot(xs, [lv["p50_ms"] for lv in rows], marker="o", color=color, label=f"{route} p50")
        ax_lat.plot(xs, [lv["p99_ms"] for lv in rows], marker="x", linestyle="--", color=color, label=f"{route} p99")
    ticks = sorted({lv["concurrency"] for lv in levels})
    for ax in (ax_tp, ax_lat):
        ax.set_xscale("log", base=2)
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.set_xlabel("concurrent requests")
        ax.grid(True, which="both", alpha=0.3)
    ax_tp.set_ylabel("output tokens / s (median)")
    ax_tp.legend(fontsize=8)
    ax_lat.set_ylabel("request latency (ms)")
    ax_lat.set_yscale("log")
    ax_lat.legend(fontsize=7, ncol=3)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
