"""Asynchronous GRPO (`max_staleness: k`): `sglgym train` end to end against a live engine, and the
staleness bound on its own."""

from __future__ import annotations

import json

import pytest

from sglgym.rollout.samples import Sample
from sglgym.trainer.producer import bound_staleness, overlap_s
from sglgym.trainer.rollouts import StepBatch

ASYNC_KEYS = {"staleness_mean", "staleness_max", "partial_rollout_frac", "dropped_stale_frac", "overlap_frac",
              "weight_version", "token_version_min", "token_version_max", "batch_start_version"}


def _train(engine, out, k: int) -> list[dict]:
    from sglgym.trainer.cli import main

    main(["--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(out),
          "--set", f"max_staleness={k}", "--set", "steps=4", "--set", "sft_steps=3", "--set", "sft_batch=8",
          "--set", "group_size=4", "--set", "batch_groups=3", "--set", "dynamic_sampling=false",
          "--set", "max_tokens=48", "--set", "eval_rows=4", "--set", "eval_samples=1", "--set", "probe_every=2",
          "--set", "rollout_seed=5"])
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def sync_run(engine, tmp_path_factory):
    return _train(engine, tmp_path_factory.mktemp("sync") / "run", 0)


@pytest.mark.parametrize("k", [1, 2])
def test_async_train_bounds_staleness_and_knows_every_version(engine, control, restore_engine, tmp_path, sync_run, k):
    lines = _train(engine, tmp_path / "run", k)
    assert [m["step"] for m in lines] == [1, 2, 3, 4] == [m["step"] for m in sync_run]
    assert not ASYNC_KEYS & set(sync_run[0])                       # k = 0 is today's loop, same keys
    version = 1                                                    # the warm-up's refit
    for m in lines:
        assert m["rollout_failures"] == 0 and m["samples"] == 12
        assert set(sync_run[0]) - {"probe_ok", "probe_max_abs_diff"} <= set(m)
        assert ASYNC_KEYS <= set(m)
        assert m["weight_version"] == version                      # one refit per trained step
        # every trained token was sampled by weights of a refit that happened, at most k versions back
        assert version - k <= m["token_version_min"] <= m["token_version_max"] <= version
        assert 0 <= m["staleness_mean"] <= m["staleness_max"] <= k and m["dropped_stale_frac"] == 0.0
        assert 0.0 <= m["overlap_frac"] < 1.0 and "tis_weight_mean" in m   # decoupled PPO's weight
        version += 1
    # generation ran ahead of training: some step trained on tokens of the previous weights. (Whether a
    # rollout is in flight at a refit depends on timing here; test_async_engine cuts one on purpose.)
    assert max(m["staleness_max"] for m in lines) >= 1
    assert all(0.0 <= m["partial_rollout_frac"] <= 1.0 for m in lines)
    assert control.weight_version() == f"step-{version}"             # the last step's refit


def _sample(group: int, versions: list[int]) -> Sample:
    n = len(versions)
    return Sample(token_ids=[1] * (n + 2), loss_mask=[0, 0] + [1] * n, gen_logprobs=[0.0, 0.0] + [-1.0] * n,
                  turn_spans=[(2, n + 2)], reward=float(group), group_id=group, prompt_index=group, truncated=False,
                  num_turns=1, env="t", engine_url="", gen_versions=[-1, -1] + versions)


def test_bound_drops_whole_groups_older_than_k_and_counts_them():
    samples = [_sample(0, [5, 5]), _sample(0, [5, 6]), _sample(1, [3, 4]), _sample(1, [6, 6]), _sample(2, [4, 6])]
    batch = StepBatch(samples, [0.1, -0.1, 0.2, -0.2, 0.0], {"batch_start_version": 4})
    out = bound_staleness(batch, version=6, max_staleness=2)       # group 1 holds a token of version 3
    assert [s.group_id for s in out.samples] == [0, 0, 2] and out.advantages == [0.1, -0.1, 0.0]
    m = out.metrics
    assert m["dropped_stale_frac"] == pytest.approx(1 / 3)
    assert m["staleness_max"] == 2 and m["staleness_mean"] == pytest.approx((1 + 1 + 1 + 0 + 2 + 0) / 6)
    assert m["partial_rollout_frac"] == pytest.approx(2 / 3)       # [5, 6] and [4, 6]
    assert (m["token_version_min"], m["token_version_max"]) == (4, 6)


def test_bound_takes_the_batch_start_for_samples_without_versions():
    s = _sample(0, [0, 0])
    s.gen_versions = []            # NeMo Gym's model server reports no versions
    out = bound_staleness(StepBatch([s], [0.0], {"batch_start_version": 3}), version=5, max_staleness=1)
    assert out.samples == [] and out.metrics["dropped_stale_frac"] == 1.0
    out = bound_staleness(StepBatch([s], [0.0], {"batch_start_version": 4}), version=5, max_staleness=1)
    assert len(out.samples) == 1 and out.metrics["staleness_max"] == 1


def test_overlap_counts_time_both_were_busy():
    assert overlap_s([(0.0, 2.0), (3.0, 4.0)], [(1.0, 3.5)]) == pytest.approx(1.5)
    assert overlap_s([(0.0, 1.0)], [(1.0, 2.0)]) == 0.0


def test_proximal_update_on_a_fresh_batch_equals_the_synchronous_one(tiny_model_path):
    """Decoupled PPO (k > 0) scores the batch with the weights the step starts from; on a batch those very
    weights generated that is the synchronous update: same loss, same weights after, to float precision.
    With token-level TIS the engine's logprobs then weigh each token (they differ here: synthetic)."""
    from transformers import AutoConfig
    from trainer_helpers import synthetic_batch

    from sglgym.kernels import GRPOLossConfig
    from sglgym.trainer.policy import HFPolicy, OptimConfig
    from sglgym.trainer.update import PolicyUpdate

    batch = synthetic_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)
    sync, proximal = (HFPolicy(tiny_model_path, OptimConfig(lr=1e-3)) for _ in range(2))
    m_sync = PolicyUpdate(sync, GRPOLossConfig(), ppo_epochs=1, micro_batch_tokens=48)(
        batch["samples"], batch["advantages"])
    m_prox = PolicyUpdate(proximal, GRPOLossConfig(), ppo_epochs=1, micro_batch_tokens=48, proximal=True)(
        batch["samples"], batch["advantages"])
    assert m_sync["loss"] == pytest.approx(m_prox["loss"], abs=1e-6) and m_sync["loss"] != 0.0
    after_sync, after_prox = dict(sync.named_tensors()), dict(proximal.named_tensors())
    assert max(float((after_sync[n] - after_prox[n]).abs().max()) for n in after_sync) <= 1e-6

    tis = PolicyUpdate(HFPolicy(tiny_model_path, OptimConfig(lr=1e-3)), GRPOLossConfig(tis_level="token"),
                       ppo_epochs=1, micro_batch_tokens=48, proximal=True)(batch["samples"], batch["advantages"])
    assert tis["tis_weight_mean"] != pytest.approx(1.0, abs=1e-3) and tis["loss"] != pytest.approx(m_sync["loss"])


def test_async_multi_turn_rollouts_span_refits(engine, control, restore_engine, tmp_path):
    """`guess` (six turns): the next batch's rollouts are in flight while a step trains and refits, so their
    turns come from two weight versions; each trains with the version of every token known and within k.
    The engine starts labelled by an earlier run (step-7): with no warm-up the run refits it to step-0."""
    from sglgym.trainer.cli import main
    from sglgym.trainer.refit import refit_from_tensor

    refit_from_tensor(control, restore_engine.named_tensors(), version="step-7")
    main(["--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(tmp_path / "run"),
          "--set", "env=guess", "--set", "max_staleness=1", "--set", "steps=3", "--set", "sft_steps=0",
          "--set", "group_size=4", "--set", "batch_groups=4", "--set", "dynamic_sampling=false",
          "--set", "max_tokens=24", "--set", "eval_rows=2", "--set", "eval_samples=1", "--set", "probe_every=3",
          # 4 rollouts at a time: a batch's generation (~4 s) outlasts a step's training (~1.5 s), so the refit
          # lands while rollouts are between turns (with 64 at a time the batch was done first)
          "--set", "concurrency=4"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["rollout_failures"] for m in lines] == [0, 0, 0] and lines[-1]["probe_ok"] is True
    assert max(m["partial_rollout_frac"] for m in lines[1:]) > 0
    for m in lines:
        assert m["weight_version"] - 1 <= m["token_version_min"] <= m["token_version_max"] <= m["weight_version"]


def test_async_tool_env(engine, control, restore_engine, tmp_path):
    """`calculator` (tools, served by our env server) with k=1: every step's rollouts finish, every trained
    token's version is known and within one step of the weights it trains from."""
    from sglgym.trainer.cli import main

    main(["--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(tmp_path / "run"),
          "--set", "env=calculator", "--set", "max_staleness=1", "--set", "steps=3", "--set", "sft_steps=0",
          "--set", "group_size=4", "--set", "batch_groups=3", "--set", "dynamic_sampling=false",
          "--set", "max_tokens=24", "--set", "eval_rows=2", "--set", "eval_samples=1", "--set", "probe_every=3"])
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3] and lines[-1]["probe_ok"] is True
    for m in lines:
        assert m["rollout_failures"] == 0 and m["samples"] == 12 and m["dropped_stale_frac"] == 0
        assert m["weight_version"] - 1 <= m["token_version_min"] <= m["token_version_max"] <= m["weight_version"]


def test_async_on_two_fsdp_ranks_and_two_replicas(engine, control, restore_engine, tmp_path):
    """`sglgym train --nproc 2 --set backend=fsdp --set max_staleness=1` with two engine replicas: rank 0's
    producer collects over both while both ranks train; each refit reaches both engines, every trained
    token is within one version, and both replicas agree with the trainer (the probe checks each)."""
    import os
    import subprocess
    import sys

    from conftest import start_engine, stop_engine

    from sglgym.trainer.refit import EngineControl

    replica = start_engine("async-replica")
    try:
        out = tmp_path / "fsdp-async"
        cmd = [sys.executable, "-m", "sglgym.cli", "train", "--nproc", "2", "--engine-url", engine.base_url,
               "--engine-url", replica.base_url, "--api-key", engine.api_key, "--out", str(out)]
        for s in ("backend=fsdp", "max_staleness=1", "steps=3", "sft_steps=2", "sft_batch=8", "group_size=4",
                  "batch_groups=4", "dynamic_sampling=false", "eval_rows=4", "eval_samples=1", "probe_every=1",
                  "dist_timeout_s=300", "loggers=[jsonl]"):
            cmd += ["--set", s]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2, 3]
        for version, m in enumerate(lines, start=1):       # version 1: the warm-up's refit
            assert m["samples"] == 16 and m["rollout_failures"] == 0
            assert m["weight_version"] == version and m["staleness_max"] <= 1 and m["dropped_stale_frac"] == 0
            assert version - 1 <= m["token_version_min"] <= m["token_version_max"] <= version
            assert m["probe_ok"] and m["probe_max_abs_diff"] <= 1e-4
        assert max(m["staleness_max"] for m in lines) == 1
        other = EngineControl(replica.base_url, replica.api_key)
        assert control.weight_version() == other.weight_version() == "step-4"
    finally:
        stop_engine(replica)
