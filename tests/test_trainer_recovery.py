"""Recovery: `sglgym train` survives a SIGKILL of the engine it started and of an env server mid-run:
each is restarted on its port, the engine gets the current weights, the step's rollouts are collected
again, and the run finishes with every step logged and the probe agreeing after the restart."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

SETS = ("steps=4", "save_every=0", "sft_steps=8", "sft_batch=16", "group_size=4", "batch_groups=2",
        "dynamic_sampling=false", "eval_rows=4", "eval_samples=1", "probe_every=1", "loggers=[jsonl]")


def _child(parent: psutil.Process, marker: str) -> psutil.Process:
    for p in parent.children(recursive=True):
        try:
            if marker in " ".join(p.cmdline()):
                return p
        except psutil.NoSuchProcess:
            continue
    raise AssertionError(f"no child process with {marker!r} in its command line")


def _run_and_kill(out: Path, marker: str, after_step: int = 1, timeout_s: float = 900) -> tuple[list[dict], str]:
    cmd = [sys.executable, "-m", "sglgym.cli", "train", "--out", str(out)]
    for s in SETS:
        cmd += ["--set", s]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    metrics, deadline = out / "metrics.jsonl", time.monotonic() + timeout_s
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= after_step):
            assert proc.poll() is None, proc.stdout.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim = _child(psutil.Process(proc.pid), marker)
        for p in [victim, *victim.children(recursive=True)]:   # the whole server: scheduler, detokenizer...
            p.send_signal(signal.SIGKILL)
        output, _ = proc.communicate(timeout=timeout_s)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    return [json.loads(line) for line in metrics.read_text().splitlines()], output


def test_engine_killed_mid_run_is_restarted_with_current_weights(tmp_path):
    lines, output = _run_and_kill(tmp_path / "run", "sglgym.cli serve")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert "died: restarting it" in output
    assert lines[-1]["engine_restarts"] == 1 and lines[-1]["rollouts_resubmitted"] >= 1
    assert all(m["probe_ok"] for m in lines), [m.get("probe_max_abs_diff") for m in lines]  # the new engine has the weights
    assert all(m["rollout_failures"] == 0 for m in lines[1:] if m["step"] > 2)


def test_env_server_killed_mid_run_is_restarted(tmp_path):
    lines, output = _run_and_kill(tmp_path / "run", "sglgym.rollout.envs.serve")
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert "env server 'arithmetic' died: restarted" in output
    assert lines[-1]["env_restarts"] == 1 and lines[-1]["engine_restarts"] == 0
    assert all(m["samples"] == 8 for m in lines)   # every step trained on a full batch


def test_external_engine_that_stays_down_stops_the_run_with_a_checkpoint(tmp_path):
    """An engine given with --engine-url is not ours to restart: wait `engine_wait_s`, then stop with a clear
    error (exit 3) and a checkpoint of the last finished step, from which `--resume` continues."""
    from conftest import start_engine, stop_engine

    from sglgym.trainer.checkpoint import checkpoint_dirs

    external = start_engine("external")
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "sglgym.cli", "train", "--out", str(out), "--engine-url", external.base_url,
           "--api-key", external.api_key, "--set", "engine_wait_s=3"]
    for s in SETS:
        cmd += ["--set", s.replace("save_every=0", "save_every=10")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        metrics, deadline = out / "metrics.jsonl", time.monotonic() + 900
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 2):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.05)
        stop_engine(external)
        output, _ = proc.communicate(timeout=600)
    finally:
        if proc.poll() is None:
            proc.kill()
        stop_engine(external)
    assert proc.returncode == 3, output[-3000:]
    assert f"engine(s) ['{external.base_url}'] did not answer /health for 3s" in output and "--resume" in output
    last = checkpoint_dirs(out)[-1].name
    assert last in ("step-2", "step-3")   # the step before the one that found the engine gone
