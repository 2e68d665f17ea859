"""The trainer side of one GRPO step, run by every rank on its own share of the step's samples:
micro-batches -> reference / old logprobs -> `ppo_epochs` optimizer steps -> the step's KL.

Micro-batches are built on the host; the policy moves each one to its device.
"""

from __future__ import annotations

from collections.abc import Sequence

from sglgym.kernels import GRPOLossConfig
from sglgym.rollout.samples import Sample

from .batches import MicroBatch, make_micro_batches
from .policy import HFPolicy


class PolicyUpdate:
    def __init__(self, policy: HFPolicy, loss_cfg: GRPOLossConfig, *, ppo_epochs: int, micro_batch_tokens: int):
        self.policy, self.loss_cfg = policy, loss_cfg
        self.ppo_epochs, self.micro_batch_tokens = ppo_epochs, micro_batch_tokens

    def __call__(self, samples: Sequence[Sample], advantages: Sequence[float]) -> dict[str, float]:
        policy, temperature = self.policy, self.loss_cfg.temperature
        mbs = make_micro_batches(samples, advantages, self.micro_batch_tokens) if samples else []
        mbs = policy.even_out(mbs)
        if self.loss_cfg.kl_type is not None:
            for mb in mbs:
                mb.ref_logprobs = policy.ref_logprobs(mb, temperature)
        if self.ppo_epochs > 1:
            # Several updates on one batch: the ratio is taken against the policy that generated it
            # (the trainer's own logprobs, so the clip sees the trainer's moves and not the engine's noise).
            for mb in mbs:
                mb.old_logprobs = policy.logprobs(mb, temperature)
        train = policy.grpo_step(mbs, self.loss_cfg)
        for _ in range(self.ppo_epochs - 1):
            last = policy.grpo_step(mbs, self.loss_cfg)
            train.update({"loss_last_epoch": last["loss"], "clip_frac_high": last.get("clip_frac_high", 0.0),
                          "clip_frac_low": last.get("clip_frac_low", 0.0)})
        train["kl_step"] = self.step_kl(mbs)
        return train

    def step_kl(self, mbs: Sequence[MicroBatch]) -> float:
        """KL(pi_before || pi_after) of this step on its own tokens: k3 = r - 1 - log r, r = pi_after/pi_before,
        averaged over the generated tokens (which were sampled from pi_before), over every rank."""
        total, count = 0.0, 0
        for mb in mbs:
            before = mb.old_logprobs if mb.old_logprobs is not None else mb.gen_logprobs
            log_r = (self.policy.logprobs(mb, self.loss_cfg.temperature).cpu() - before.cpu()).clamp(-20, 20)
            k3 = log_r.exp() - 1 - log_r
            mask = mb.loss_mask.cpu() != 0
            total += float(k3[mask].sum())
            count += int(mask.sum())
        total, count = self.policy.ranks.all_reduce([total, count], "sum")
        return total / max(count, 1)
