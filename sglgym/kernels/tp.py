"""Vocab-parallel glue (Megatron style): each tensor-parallel rank holds logits for a contiguous slice
of the vocabulary, [rank * V_local, (rank + 1) * V_local). Forward combines per-rank (max, sum-exp,
target logit) with two all-reduces over O(T) vectors; backward needs no communication because every
rank then holds the same logprobs and loss, and each writes the gradient of its own slice."""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor


def tp_info(group) -> tuple[Optional[object], int, int]:
    """(group or None when there is nothing to reduce over, rank, world size)."""
    if group is None or not dist.is_available() or not dist.is_initialized():
        return None, 0, 1
    world = dist.get_world_size(group)
    if world == 1:
        return None, 0, 1
    return group, dist.get_rank(group), world


def combine_lse(m: Tensor, s: Tensor, tgt: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """Per-rank running max m, sum-exp s (relative to m), target logit tgt (0 off-shard)
    -> (global max, log of global sum-exp, target logit). lse = max + log_sum, but it is kept in two parts:
    with logits ~1e4 a single fp32 lse would lose ~5e-4 to rounding, while x - max is exact."""
    if group is None:
        return m, torch.log(s), tgt
    gmax = m.clone()
    dist.all_reduce(gmax, op=dist.ReduceOp.MAX, group=group)
    packed = torch.stack([s * torch.exp(m - gmax), tgt])
    dist.all_reduce(packed, op=dist.ReduceOp.SUM, group=group)
    return gmax, torch.log(packed[0]), packed[1]
