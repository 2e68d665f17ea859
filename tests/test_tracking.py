"""Run tracking: metrics.jsonl, TensorBoard event files (read back with TensorBoard's own reader) and W&B in
offline mode, across a resume that repeats steps the checkpoint did not hold."""

from __future__ import annotations

import json

from sglgym.trainer.tracking import RunTracker


def _steps(tracker_dir, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(tracker_dir / "tensorboard")).Reload()
    return [(e.step, round(e.value, 6)) for e in events.Scalars(tag)]


def test_jsonl_tensorboard_and_wandb_offline_across_a_resume(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_SILENT", "true")
    loggers = ["jsonl", "tensorboard", "wandb"]
    first = RunTracker(tmp_path, loggers, first_step=1, config={"lr": 1e-3})
    for step in (1, 2, 3):  # the run dies after logging step 3; its last checkpoint is step 2
        first.log({"step": step, "reward_mean": step / 10, "reward_mean/guess": step / 20, "skipped": "x"})
    first.close()
    run_id = (tmp_path / "wandb_run_id").read_text()

    resumed = RunTracker(tmp_path, loggers, first_step=3)
    for step in (3, 4):
        resumed.log({"step": step, "reward_mean": step / 10 + 1, "reward_mean/guess": step / 20})
    resumed.summary({"reward_gain": 0.5, "config": {}})
    resumed.close()

    lines = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4] and lines[2]["reward_mean"] == 1.3   # the resumed step 3
    assert _steps(tmp_path, "reward_mean") == [(1, 0.1), (2, 0.2), (3, 1.3), (4, 1.4)]   # purged, then continued
    assert [s for s, _ in _steps(tmp_path, "reward_mean/guess")] == [1, 2, 3, 4]     # per-env metrics too
    assert (tmp_path / "wandb_run_id").read_text() == run_id                          # one W&B run, continued
    offline = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))
    assert offline and all(f.stat().st_size > 0 for f in offline)
