"""Backend `megatron` under real torchrun ranks (gloo, megatron-core's real schedule, DDP and optimizer on CPU
with its CUDA assumptions patched in the test processes only): one GRPO step with tensor parallelism 2, and
with data parallelism 2, equals the single-process `hf` step on the same batch."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from trainer_helpers import assert_same_update, run_torchrun, synthetic_batch  # noqa: E402

from sglgym.kernels import GRPOLossConfig  # noqa: E402
from sglgym.trainer.batches import make_micro_batches  # noqa: E402
from sglgym.trainer.policy import HFPolicy, OptimConfig  # noqa: E402


@pytest.mark.parametrize("tp,loss_agg", [(2, "token-mean"), (2, "seq-mean-token-sum-norm"), (1, "seq-mean-token-mean")])
def test_megatron_two_ranks_equal_single_process_step(tp, loss_agg, tiny_model_path, tmp_path):
    from transformers import AutoConfig

    batch = synthetic_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun("megatron_step.py", 2, ["--model", tiny_model_path, "--batch", str(tmp_path / "batch.pt"),
                                         "--loss-agg", loss_agg, "--tp", str(tp), "--out", str(tmp_path / "m.pt")])
    mcore = torch.load(tmp_path / "m.pt", weights_only=False)

    single = HFPolicy(tiny_model_path, OptimConfig(lr=1e-3, grad_clip=1e9))
    before = single.score([batch["samples"][0].token_ids])
    metrics = single.grpo_step(make_micro_batches(batch["samples"], batch["advantages"], 10_000),
                               GRPOLossConfig(loss_agg=loss_agg, eps_high=0.28))
    assert mcore["metrics"]["num_tokens"] == metrics["num_tokens"]
    assert mcore["metrics"]["loss"] == pytest.approx(metrics["loss"], abs=1e-6)
    assert mcore["metrics"]["grad_norm"] == pytest.approx(metrics["grad_norm"], rel=1e-4)
    assert_same_update(mcore["weights"], single.model)
    # the megatron model scored after its step = the HF model after the same step; and the step moved it
    after = single.score([batch["samples"][0].token_ids])
    assert max(abs(a - b) for a, b in zip(mcore["scores"][0], after[0])) < 1e-4
    assert max(abs(a - b) for a, b in zip(before[0], after[0])) > 1e-3
