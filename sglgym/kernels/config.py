"""GRPOLossConfig: every knob of the policy loss in one plain dataclass."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Optional

LossAgg = Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm"]
LOSS_AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")

# TRL `loss_type` -> our `loss_agg` (verl's `loss_agg_mode` names are ours verbatim).
#   grpo    : per-sequence token mean, then mean over sequences
#   bnpo    : token mean over the local batch
#   dapo    : token mean with the *global* token count (pass `global_num_tokens=` to grpo_loss)
#   dr_grpo : sum / (num_seqs * L_max), L_max = max completion length (`norm_constant`)
TRL_LOSS_TYPE_TO_AGG = {
    "grpo": "seq-mean-token-mean",
    "bnpo": "token-mean",
    "dapo": "token-mean",
    "dr_grpo": "seq-mean-token-sum-norm",
}

KL_TYPES = (None, "k1", "k2", "k3")


@dataclass
class GRPOLossConfig:
    """Policy-loss variant. Defaults: vanilla GRPO/PPO clip 0.2, no KL, no mismatch correction.

    eps_low / eps_high: PPO clip range [1 - eps_low, 1 + eps_high] (DAPO clip-higher: eps_high=0.28).
    dual_clip_c: dual-clip constant c > 1 (verl/NeMo); bounds the loss of negative-advantage tokens by
        -A*c. None disables.
    importance_level: "token" (PPO/GRPO) or "sequence" (GSPO: per-sequence geometric-mean ratio; the
        gradient uses the GSPO-token form sg[s_i] * pi/sg[pi], as verl does).
    kl_type / beta: KL penalty to the reference policy added per token as beta * kl.
        k1 = logp - ref, k2 = 0.5 (logp - ref)^2, k3 = exp(ref - logp) - (ref - logp) - 1.
        ref - logp is clamped to [-log_ratio_clamp, log_ratio_clamp], k3 to <= kl_clamp (verl's clamps).
    tis_level / tis_cap: rollout-mismatch correction. The policy-gradient term is multiplied by the
        detached weight min(pi_old / pi_gen, tis_cap), per token ("token") or per sequence
        ("sequence": product over the sequence's loss tokens). Needs gen_logprobs.
    loss_agg: see LOSS_AGGS and TRL_LOSS_TYPE_TO_AGG.
    norm_constant: Dr. GRPO's constant L for "seq-mean-token-sum-norm"; None -> the largest number of
        loss tokens in one sequence of this batch (set it to max_new_tokens for a true constant).
    temperature: sampling temperature; logprobs are taken from log_softmax(logits / temperature).
    log_ratio_clamp: |log ratio| bound before exp (ratio and KL), as verl/NeMo do, so one bad token
        cannot make the loss inf.
    """

    eps_low: float = 0.2
    eps_high: float = 0.2
    dual_clip_c: Optional[float] = None
    importance_level: Literal["token", "sequence"] = "token"
    kl_type: Optional[Literal["k1", "k2", "k3"]] = None
    beta: float = 0.0
    tis_level: Optional[Literal["token", "sequence"]] = None
    tis_cap: float = 2.0
    loss_agg: LossAgg = "token-mean"
    norm_constant: Optional[float] = None
    temperature: float = 1.0
    log_ratio_clamp: float = 20.0
    kl_clamp: float = 10.0

    def __post_init__(self) -> None:
        if self.importance_level not in ("token", "sequence"):
            raise ValueError(f"importance_level must be 'token' or 'sequence', got {self.importance_level!r}")
        if self.kl_type not in KL_TYPES:
            raise ValueError(f"kl_type must be one of {KL_TYPES}, got {self.kl_type!r}")
        if self.tis_level not in (None, "token", "sequence"):
            raise ValueError(f"tis_level must be None, 'token' or 'sequence', got {self.tis_level!r}")
        if self.loss_agg not in LOSS_AGGS:
            raise ValueError(f"loss_agg must be one of {LOSS_AGGS}, got {self.loss_agg!r}")
        if self.dual_clip_c is not None and self.dual_clip_c <= 1.0:
            raise ValueError("dual_clip_c must be > 1")
        if self.temperature <= 0:
            raise ValueError("temperature must be > 0")
        if self.tis_cap <= 0:
            raise ValueError("tis_cap must be > 0")
        if not (0 <= self.eps_low < 1) or self.eps_high < 0:
            raise ValueError("need 0 <= eps_low < 1 and eps_high >= 0")

    @classmethod
    def from_trl(cls, loss_type: str, max_completion_length: Optional[int] = None, **kwargs) -> "GRPOLossConfig":
        """Config with TRL's aggregation for `loss_type` (grpo, bnpo, dapo, dr_grpo).

        dr_grpo divides by num_seqs * max_completion_length, as TRL does: pass it (or `norm_constant`).
        """
        if loss_type not in TRL_LOSS_TYPE_TO_AGG:
            raise ValueError(f"unknown TRL loss_type {loss_type!r}; known: {sorted(TRL_LOSS_TYPE_TO_AGG)}")
        if loss_type == "dr_grpo" and kwargs.get("norm_constant") is None:
            if not max_completion_length or max_completion_length <= 0:
                raise ValueError("dr_grpo needs max_completion_length (TRL's L: the longest allowed completion)")
            kwargs["norm_constant"] = float(max_completion_length)
        return cls(loss_agg=TRL_LOSS_TYPE_TO_AGG[loss_type], **kwargs)
