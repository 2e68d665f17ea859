"""GRPO kernels: group advantages and the fused policy loss (Triton on CUDA, chunked torch elsewhere).

    from sglgym.kernels import grpo_loss, group_advantages, token_logprobs, GRPOLossConfig

The plain-torch definition of every number lives in `reference.py`; the fast paths are tested against it.
Triton is imported lazily, on the first call that needs it (so TRITON_INTERPRET can be set before).
"""

from .api import group_advantages, grpo_loss, token_logprobs
from .config import LOSS_AGGS, TRL_LOSS_TYPE_TO_AGG, GRPOLossConfig

__all__ = ["GRPOLossConfig", "LOSS_AGGS", "TRL_LOSS_TYPE_TO_AGG", "group_advantages", "grpo_loss", "token_logprobs"]
