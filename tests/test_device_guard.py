"""GPU device bugs caught on CPU: the whole train step of every backend under a simulated device
(tests/device_guard.py), where a host tensor reaching the model or the loss raises as CUDA would."""

from __future__ import annotations

import pytest
import torch
from device_guard import DeviceMismatch, simulated_device
from trainer_helpers import run_torchrun, synthetic_batch

from sglgym.kernels import GRPOLossConfig, token_logprobs
from sglgym.trainer.policy import HFPolicy, OptimConfig
from sglgym.trainer.update import PolicyUpdate

KL_LOSS = GRPOLossConfig(kl_type="k3", beta=0.05, eps_high=0.28)


@pytest.fixture(scope="module")
def batch(tiny_model_path):
    from transformers import AutoConfig

    return synthetic_batch(AutoConfig.from_pretrained(tiny_model_path).vocab_size)


def test_guard_raises_where_cuda_would():
    layer = torch.nn.Linear(4, 3)
    with simulated_device():
        x = torch.randn(2, 4)                  # made on the host
        with pytest.raises(DeviceMismatch, match="host tensor"):
            layer(x)
        y = layer(x.to("cpu"))                 # moved to the device: fine
        with pytest.raises(DeviceMismatch):
            y + torch.ones(2, 3)               # a device result meets a new host tensor
        assert (y.cpu() + torch.ones(2, 3)).shape == (2, 3)   # both on the host again
        assert (y * torch.tensor(2.0)).shape == (2, 3)         # a host scalar may mix


def test_hf_train_step_under_the_guard(batch, tiny_model_path):
    policy = HFPolicy(tiny_model_path, OptimConfig(lr=1e-3))
    guard = simulated_device()
    with guard:
        policy.freeze_reference()
        metrics = PolicyUpdate(policy, KL_LOSS, ppo_epochs=2, micro_batch_tokens=48)(
            batch["samples"], batch["advantages"])
        scores = policy.score([s.token_ids for s in batch["samples"][:2]])
        policy.named_tensors()
    assert guard.checked >= 50 and metrics["grad_norm"] > 0 and metrics["kl_step"] > 0
    assert len(scores[0]) == len(batch["samples"][0].token_ids) - 1


class UnmovedLogprobs(HFPolicy):
    """The logprob recompute as it was before the fix: the host micro-batch straight into the model."""

    @torch.no_grad()
    def logprobs(self, mb, temperature: float = 1.0):
        return token_logprobs(self.packed_logits(mb), mb.target_ids, temperature)


def test_guard_catches_the_old_logprob_recompute(batch, tiny_model_path):
    policy = UnmovedLogprobs(tiny_model_path)
    with simulated_device(), pytest.raises(DeviceMismatch, match="host tensor"):
        PolicyUpdate(policy, GRPOLossConfig(), ppo_epochs=2, micro_batch_tokens=48)(batch["samples"], batch["advantages"])


def test_fsdp_train_step_under_the_guard(batch, tiny_model_path, tmp_path):
    torch.save(batch, tmp_path / "batch.pt")
    run_torchrun("fsdp_step.py", 2, ["--model", tiny_model_path, "--batch", str(tmp_path / "batch.pt"),
                                     "--loss-agg", "token-mean", "--guard", "--out", str(tmp_path / "out.pt")])
    out = torch.load(tmp_path / "out.pt", weights_only=False)
    assert out["metrics"]["guard_checked_ops"] >= 50 and out["metrics"]["grad_norm"] > 0
