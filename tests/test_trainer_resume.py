"""Runs that last: checkpoints restore the trainer exactly (hf, and fsdp on 2 torchrun ranks), a run killed
with SIGKILL resumes from its last checkpoint and finishes with every step logged once, configs that
changed what is trained are refused, and TensorBoard holds the reward of every step."""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from trainer_helpers import RANKS_DIR, run_torchrun, synthetic_batch

from sglgym.trainer.checkpoint import checkpoint_dirs, read_trainer_state


def _roundtrip(backend: str, model: str, tmp_path: Path) -> dict:
    from transformers import AutoConfig

    torch.save(synthetic_batch(AutoConfig.from_pretrained(model).vocab_size), tmp_path / "batch.pt")
    args = ["--backend", backend, "--model", model, "--batch", str(tmp_path / "batch.pt"),
            "--dir", str(tmp_path / "run"), "--out", str(tmp_path / "found.pt")]
    if backend == "fsdp":
        run_torchrun("checkpoint_roundtrip.py", 2, args)
    else:
        r = subprocess.run([sys.executable, str(RANKS_DIR / "checkpoint_roundtrip.py"), *args], capture_output=True,
                           text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-4000:]
    return torch.load(tmp_path / "found.pt", weights_only=False)


@pytest.mark.parametrize("backend", ["hf", "fsdp"])
def test_checkpoint_restores_weights_optimizer_and_rng_exactly(backend, tiny_model_path, tmp_path):
    found = _roundtrip(backend, tiny_model_path, tmp_path)
    assert found["world_size"] == (2 if backend == "fsdp" else 1)
    assert found["second_step_moved"] > 1e-5          # the state after the checkpoint really differs
    assert found["weights_equal"] == found["names"]     # bit for bit
    assert found["next_step_equal"] == found["names"]   # Adam moments and step count came back too
    assert found["rng_equal"] and found["state"]["step"] == 1
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step-1"]
    assert not list((tmp_path / "run" / "checkpoints").glob(".tmp-*"))


def _train_cmd(engine, out: Path, *sets: str) -> list[str]:
    cmd = [sys.executable, "-m", "sglgym.cli", "train", "--engine-url", engine.base_url, "--api-key", engine.api_key,
           "--out", str(out)]
    for s in ("steps=6", "save_every=2", "sft_steps=8", "sft_batch=16", "group_size=4", "batch_groups=2",
              "dynamic_sampling=false", "eval_rows=4", "eval_samples=1", "probe_every=1", *sets):
        cmd += ["--set", s]
    return cmd


def _kill_after_checkpoint(cmd: list[str], out: Path, step: int, timeout_s: float = 600) -> int:
    """Start `sglgym train`, SIGKILL its whole process group at a random moment after checkpoint `step`
    appears (before the next one); returns the last complete checkpoint's step."""
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.monotonic() + timeout_s
    try:
        while not (out / "checkpoints" / f"step-{step}").exists():
            assert proc.poll() is None, f"train exited ({proc.returncode}) before checkpoint {step}"
            assert time.monotonic() < deadline, f"no checkpoint {step} after {timeout_s}s"
            time.sleep(0.05)
        # somewhere in the next step (rollouts, update or refit); a quiet machine runs a step in ~0.4 s, so a
        # longer wait let the run reach its end before the kill
        time.sleep(random.uniform(0.0, 0.3))
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    return int(checkpoint_dirs(out)[-1].name.split("-")[1])


def test_killed_run_resumes_from_its_last_checkpoint(engine, control, restore_engine, tmp_path):
    out = tmp_path / "run"
    cmd = _train_cmd(engine, out)
    last = _kill_after_checkpoint(cmd, out, step=2)
    assert last in (2, 4)
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged[:last] == list(range(1, last + 1))    # the killed run may have logged steps past `last`

    r = subprocess.run([sys.executable, "-m", "sglgym.cli", "train", "--resume", str(out)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-4000:]
    assert f"resumed from {out / 'checkpoints' / f'step-{last}'}" in r.stdout
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4, 5, 6]      # every step once
    assert all(m["probe_ok"] for m in lines[last:])                # the engine was refit from the checkpoint
    assert control.weight_version() == "step-7"                    # the warm-up's refit, then one per step
    summary = json.loads((out / "summary.json").read_text())
    assert summary["resumed_from"].endswith(f"step-{last}") and summary["grpo_steps"] == 6
    assert read_trainer_state(checkpoint_dirs(out)[-1])["step"] == 6

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(str(out / "tensorboard")).Reload()
    assert [e.step for e in events.Scalars("reward_mean")] == [1, 2, 3, 4, 5, 6]


def test_resume_refuses_a_config_that_changes_training(tmp_path):
    from sglgym.trainer.cli import build_parser, load, resume_point
    from sglgym.trainer.config import TrainConfig

    out = tmp_path / "run"
    saved = out / "checkpoints" / "step-4"
    saved.mkdir(parents=True)
    (saved / "trainer_state.json").write_text(json.dumps({"step": 4, "config": TrainConfig(out_dir=str(out)).model_dump()}))
    args = build_parser().parse_args(["--out", str(out), "--set", "lr=0.5", "--set", "loss.eps_high=0.3",
                                      "--set", "steps=9"])
    with pytest.raises(SystemExit) as e:
        resume_point(load(args), explicit=False, force=False)
    assert e.value.code == 2
    assert resume_point(load(args), explicit=False, force=True) == saved           # --force: resume anyway
    same = build_parser().parse_args(["--resume", str(out), "--set", "steps=9"])  # steps may change
    assert resume_point(load(same), explicit=True, force=False) == saved
    (out / "summary.json").write_text("{}")   # that run finished: a plain run over OUT starts afresh
    assert resume_point(load(build_parser().parse_args(["--out", str(out)])), explicit=False, force=False) is None
    assert not (out / "checkpoints").exists() and not (out / "summary.json").exists()


def test_resume_names_the_differing_keys(tmp_path, capsys):
    from sglgym.trainer.cli import build_parser, load, resume_point
    from sglgym.trainer.config import TrainConfig

    out = tmp_path / "run"
    (out / "checkpoints" / "step-2").mkdir(parents=True)
    (out / "checkpoints" / "step-2" / "trainer_state.json").write_text(
        json.dumps({"step": 2, "config": TrainConfig().model_dump()}))
    with pytest.raises(SystemExit):
        resume_point(load(build_parser().parse_args(["--out", str(out), "--set", "lr=0.5",
                                                     "--set", "loss.eps_high=0.3"])), False, False)
    err = capsys.readouterr().err
    assert "loss.eps_high, lr differ" in err and "--force" in err


def test_megatron_checkpoint_restores_the_trainer_exactly(tiny_model_path, tmp_path):
    """TP=2 on 2 ranks: each rank's shard and optimizer state come back (resume on the same layout)."""
    from transformers import AutoConfig

    torch.save(synthetic_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size), tmp_path / "batch.pt")
    run_torchrun("megatron_checkpoint.py", 2, ["--model", tiny_model_path, "--batch", str(tmp_path / "batch.pt"),
                                               "--loss-agg", "token-mean", "--dir", str(tmp_path / "run"),
                                               "--out", str(tmp_path / "found.pt")])
    found = torch.load(tmp_path / "found.pt", weights_only=False)
    assert found["second_step_moved"] > 1e-5
    assert found["weights_equal"] == found["names"] and found["next_step_equal"] == found["names"]
    assert {"megatron-rank0.pt", "megatron-rank1.pt", "trainer_state.json"} <= set(found["files"])
