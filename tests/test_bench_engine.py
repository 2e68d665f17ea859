"""`sglgym bench` smoke run against the live test engine: three routes, tokens flowing, no errors."""

from __future__ import annotations

import json

from sglgym.bench import engine as bench_engine
from sglgym.bench.client import ROUTES, percentile


def test_percentile():
    assert percentile([], 50) is None
    assert percentile([3.0], 99) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert abs(percentile(list(map(float, range(101))), 99) - 99.0) < 1e-9


def test_bench_smoke(engine, tmp_path):
    out = tmp_path / "engine-smoke.json"
    bench_engine.main([
        "--base-url", engine.base_url, "--api-key", engine.api_key, "--concurrency", "1,4",
        "--repetitions", "1", "--requests-per-worker", "2", "--min-requests", "2", "--max-tokens", "8",
        "--prompts", "4", "--round-time-limit", "30", "--out", str(out),
    ])
    result = json.loads(out.read_text())
    assert {lv["route"] for lv in result["levels"]} == set(ROUTES)
    assert {lv["concurrency"] for lv in result["levels"]} == {1, 4}
    for lv in result["levels"]:
        assert lv["errors"] == 0, lv
        assert lv["tokens_per_s"] > 0 and lv["requests"] > 0
        assert lv["p50_ms"] is not None and lv["p99_ms"] >= lv["p50_ms"]
    assert [r["concurrency"] for r in result["ratios"]] == [1, 4]
    assert all(r["a_over_b"] > 0 and r["a_over_c"] > 0 and r["d_over_a"] > 0 for r in result["ratios"])
    machine = result["machine"]
    assert machine["cpu_cores"] and machine["sglang"] and machine["torch"]
    assert out.with_suffix(".png").stat().st_size > 0


def test_bench_runs_from_the_installed_package(tmp_path):
    """`sglgym bench` needs nothing from the repository's bench/ folder (run from elsewhere)."""
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "sglgym.cli", "bench", "--help"], cwd=tmp_path, timeout=120,
                       capture_output=True, text=True, env={k: v for k, v in __import__("os").environ.items()
                                                            if k != "PYTHONPATH"})
    assert r.returncode == 0 and "usage: sglgym bench" in r.stdout, r.stderr[-2000:]
