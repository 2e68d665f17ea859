"""Fused group advantages in Triton: rewards [B] + group ids [B] -> advantages [B] and, for packed
sequences, per-token advantages [T] in the same launch. One program per group; deterministic (no atomics):
members are made contiguous by a stable sort on the host side first."""

from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .fused_loss import interpreting


@triton.jit
def _group_adv_kernel(
    rewards_ptr, order_ptr, starts_ptr, counts_ptr, adv_ptr, cu_ptr, tok_ptr, eps,
    LOO: tl.constexpr, STD: tl.constexpr, HAS_CU: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):
    grp = tl.program_id(0)
    start = tl.load(starts_ptr + grp)
    n = tl.load(counts_ptr + grp)
    offs = tl.arange(0, BLOCK_N)
    inb = offs < n
    idx = tl.load(order_ptr + start + offs, mask=inb, other=0)
    r = tl.load(rewards_ptr + idx, mask=inb, other=0.0).to(tl.float32)
    nf = n.to(tl.float32)
    mean = tl.sum(r, axis=0) / nf
    dev = tl.where(inb, r - mean, 0.0)
    var = tl.sum(dev * dev, axis=0) / tl.maximum(nf - 1.0, 1.0)  # unbiased, as TRL/verl/NeMo
    # All-equal groups (incl. singletons) get exactly 0; compare values, not a rounded std, to decide.
    degenerate = tl.max(tl.where(inb, r, float("-inf")), axis=0) == tl.min(tl.where(inb, r, float("inf")), axis=0)
    scale = tl.full([], 1.0, tl.float32)
    if LOO:
        scale = scale * nf / tl.maximum(nf - 1.0, 1.0)  # r - mean(others) = n/(n-1) (r - mean)
    if STD:
        scale = scale / (tl.sqrt(var) + eps)
    scale = tl.where(degenerate, 0.0, scale)
    tl.store(adv_ptr + idx, dev * scale, mask=inb)
    if HAS_CU:
        tcols = tl.arange(0, BLOCK_T)
        for j in range(0, n):
            b = tl.load(order_ptr + start + j)
            a = (tl.load(rewards_ptr + b).to(tl.float32) - mean) * scale
            t0 = tl.load(cu_ptr + b)
            t1 = tl.load(cu_ptr + b + 1)
            for ts in range(t0, t1, BLOCK_T):
                to = ts + tcols
                tl.store(tok_ptr + to, tl.zeros([BLOCK_T], tl.float32) + a, mask=to < t1)


@torch.no_grad()
def group_advantages_triton(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    baseline: str = "mean",
    std_normalize: bool = True,
    eps: float = 1e-6,
    cu_seqlens: Optional[Tensor] = None,
    num_tokens: Optional[int] = None,
) -> Tensor:
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    dev = rewards.device
    nseq = rewards.shape[0]
    adv = torch.zeros(nseq, dtype=torch.float32, device=dev)
    has_cu = cu_seqlens is not None
    cu = cu_seqlens.to(device=dev, dtype=torch.int64).contiguous() if has_cu else adv
    if has_cu:
        t = int(cu[-1]) if num_tokens is None else num_tokens
        tok = torch.zeros(t, dtype=torch.float32, device=dev)
    else:
        tok = adv
    if nseq == 0:
        return tok if has_cu else adv
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    order = torch.argsort(inv, stable=True)
    starts = torch.cumsum(counts, 0) - counts
    block_n = max(16, triton.next_power_of_2(int(counts.max())))
    _group_adv_kernel[(counts.numel(),)](
        rewards.contiguous(), order, starts, counts, adv, cu, tok, float(eps),
        LOO=baseline == "loo", STD=std_normalize, HAS_CU=has_cu, BLOCK_N=block_n,
        BLOCK_T=4096 if interpreting() else 1024, num_warps=1 if interpreting() else 4,
    )
    return tok if has_cu else adv
