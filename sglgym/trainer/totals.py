"""StepTotals: the denominators of one optimizer step, shared by every backend (hf, fsdp, megatron).

Each micro-batch's loss is taken with the *step's* counts (every micro-batch on every data-parallel
rank), so the micro-batch losses add up to the loss of the whole step's batch however the batch was
split over micro-batches and ranks.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from sglgym.kernels import GRPOLossConfig

from .batches import MicroBatch


@dataclass(frozen=True)
class StepTotals:
    """Denominators of the whole optimizer step (every micro-batch, every data-parallel rank)."""
    num_tokens: int       # loss tokens
    num_seqs: int         # sequences with at least one loss token
    max_seq_tokens: int   # most loss tokens in one sequence (Dr. GRPO's L when norm_constant is None)


def _seq_token_counts(mb: MicroBatch) -> Tensor:
    cu = mb.cu_seqlens.tolist()
    mask = (mb.loss_mask != 0).to(torch.int64).cpu()
    return torch.stack([mask[a:b].sum() for a, b in zip(cu[:-1], cu[1:])])


def step_totals(micro_batches: Sequence[MicroBatch], dp_group=None) -> StepTotals:
    """StepTotals of this rank's micro-batches, all-reduced over the data-parallel group `dp_group` when
    given (never over a default group: under tensor parallelism that would count sequences twice)."""
    counts = torch.cat([_seq_token_counts(mb) for mb in micro_batches]) if micro_batches else torch.zeros(0)
    sums = torch.tensor([int(counts.sum()), int((counts > 0).sum())], dtype=torch.int64)
    longest = torch.tensor([int(counts.max()) if counts.numel() else 0], dtype=torch.int64)
    dist = torch.distributed
    if dp_group is not None and dist.is_initialized() and dist.get_world_size(dp_group) > 1:
        dev = "cuda" if dist.get_backend(dp_group) == "nccl" else "cpu"  # NCCL reduces device tensors only
        sums, longest = sums.to(dev), longest.to(dev)
        dist.all_reduce(sums, group=dp_group)
        dist.all_reduce(longest, op=dist.ReduceOp.MAX, group=dp_group)
    return StepTotals(int(sums[0]), int(sums[1]), int(longest[0]))


def step_loss_config(cfg: GRPOLossConfig, totals: StepTotals) -> GRPOLossConfig:
    """Dr. GRPO's default L (longest sequence) must be the step's, not each micro-batch's."""
    if cfg.loss_agg == "seq-mean-token-sum-norm" and cfg.norm_constant is None:
        return dataclasses.replace(cfg, norm_constant=float(max(totals.max_seq_tokens, 1)))
    return cfg
