"""Backend `fsdp` under real torchrun ranks (gloo): one GRPO step on 2 ranks equals the single-process `hf`
step on the same batch, for each loss aggregation, with the batch split differently on each side
(2 ranks x micro-batches of 48 tokens vs one process with one micro-batch)."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import assert_same_update, run_torchrun, synthetic_batch

from sglgym.kernels import GRPOLossConfig
from sglgym.trainer.batches import make_micro_batches, split_over_ranks
from sglgym.trainer.policy import HFPolicy, OptimConfig


def test_split_over_ranks_balances_tokens_and_keeps_every_sample():
    batch = synthetic_batch(vocab=100)
    shares = split_over_ranks(batch["samples"], batch["advantages"], 2)
    assert sorted(id(s) for share, _ in shares for s in share) == sorted(id(s) for s in batch["samples"])
    loads = [sum(len(s.token_ids) for s in share) for share, _ in shares]
    longest = max(len(s.token_ids) for s in batch["samples"])
    assert abs(loads[0] - loads[1]) <= longest, loads
    for share, adv in shares:  # each sample keeps its own advantage
        index = {id(s): a for s, a in zip(batch["samples"], batch["advantages"])}
        assert adv == [index[id(s)] for s in share]


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_fsdp_two_ranks_equal_single_process_step(loss_agg, tiny_model_path, tmp_path):
    from transformers import AutoConfig

    batch = synthetic_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun("fsdp_step.py", 2, ["--model", tiny_model_path, "--batch", str(tmp_path / "batch.pt"), "--loss-agg", loss_agg,
                     "--micro-batch-tokens", "48", "--out", str(tmp_path / "fsdp.pt")])
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    assert fsdp["world_size"] == 2 and fsdp["micro_batches"] >= 2  # split over ranks and over micro-batches

    single = HFPolicy(tiny_model_path, OptimConfig(lr=1e-3))
    mbs = make_micro_batches(batch["samples"], batch["advantages"], 10_000)
    assert len(mbs) == 1
    metrics = single.grpo_step(mbs, GRPOLossConfig(loss_agg=loss_agg, eps_high=0.28))

    assert fsdp["metrics"]["num_tokens"] == metrics["num_tokens"]
    assert fsdp["metrics"]["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert fsdp["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-5)
    grads = {n: p.grad for n, p in single.model.named_parameters()}
    for name, grad in fsdp["grads"].items():
        assert torch.allclose(grad, grads[name], rtol=1e-4, atol=1e-7), name
    assert_same_update(fsdp["weights"], single.model)
    weights = single.model.state_dict()
    moved = max((HFPolicy(tiny_model_path).model.state_dict()[n] - w).abs().max().item() for n, w in weights.items())
    assert moved > 1e-4  # the step did move the weights


def test_fsdp_two_ranks_equal_single_process_warmup_step(tiny_model_path, tmp_path):
    """The supervised warm-up step (mean NLL of the loss tokens over every rank) equals the single process's."""
    from transformers import AutoConfig

    batch = synthetic_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size, seed=1)
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun("fsdp_step.py", 2, ["--model", tiny_model_path, "--batch", str(tmp_path / "batch.pt"), "--sft",
                                     "--loss-agg", "token-mean", "--out", str(tmp_path / "fsdp.pt")])
    fsdp = torch.load(tmp_path / "fsdp.pt", weights_only=False)
    single = HFPolicy(tiny_model_path, OptimConfig(lr=1e-3))
    loss = single.sft_step(make_micro_batches(batch["samples"], batch["advantages"], 10_000))
    assert fsdp["metrics"]["loss"] == pytest.approx(loss, abs=1e-6)
    assert_same_update(fsdp["weights"], single.model)


def test_sglgym_train_fsdp_two_ranks_refits_two_replicas(engine, control, restore_engine, tmp_path):
    """`sglgym train --nproc 2 --set backend=fsdp` with two engine replicas: rank 0 collects over both,
    both ranks train, and both engines end on the trained weights (the probe checks each)."""
    import json
    import os
    import subprocess
    import sys

    from conftest import start_engine, stop_engine

    from sglgym.trainer.refit import EngineControl

    replica = start_engine("fsdp-replica")
    try:
        out = tmp_path / "fsdp"
        cmd = [sys.executable, "-m", "sglgym.cli", "train", "--nproc", "2", "--engine-url", engine.base_url,
               "--engine-url", replica.base_url, "--api-key", engine.api_key, "--out", str(out),
               "--set", "backend=fsdp", "--set", "steps=2", "--set", "sft_steps=2", "--set", "sft_batch=8",
               "--set", "group_size=4", "--set", "batch_groups=4", "--set", "dynamic_sampling=false",
               "--set", "eval_rows=4", "--set", "eval_samples=1", "--set", "probe_every=1",
               "--set", "time_budget_s=null", "--set", "dist_timeout_s=300"]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=900, env={**os.environ, "OMP_NUM_THREADS": "1"})
        assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-6000:]
        lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        assert [m["step"] for m in lines] == [1, 2]
        for m in lines:
            assert m["samples"] == 16 and m["rollout_failures"] == 0
            assert m["probe_ok"] and m["probe_max_abs_diff"] <= 1e-4   # every replica agrees with the trainer
            # (the tiny model's rewards may all be equal in a group: a zero gradient is then right)
            assert m["refit_gb_per_s"] > 0 and m["grad_norm"] >= 0 and m["num_tokens"] > 0
        summary = json.loads((out / "summary.json").read_text())
        assert summary["machine"]["ranks"] == 2 and summary["probe_before_grpo"]["probe_ok"]
        other = EngineControl(replica.base_url, replica.api_key)
        # 2 GRPO steps + the warm-up's refit: both engines were refit three times
        assert control.weight_version() == "step-3" and other.weight_version() == "step-3"
    finally:
        stop_engine(replica)
