"""Chunked torch primitives for the O(T*V) part (the CPU path, and the fallback anywhere).

Rows are processed `chunk_rows` at a time, so temporaries are O(chunk_rows * V) and never [T, V]; the
only [T, V] buffer is the logits gradient itself, which `out=logits` writes in place.
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Default temporaries budget per chunk (fp32 elements): 2^20 -> 4 MiB, about one L2 slice on a server CPU.
CHUNK_ELEMS = 1 << 20


def default_chunk_rows(num_rows: int, vocab: int) -> int:
    return max(1, min(num_rows, CHUNK_ELEMS // max(vocab, 1)))


def _local_targets(target_ids: Tensor, vocab_start: int, vocab: int) -> tuple[Tensor, Tensor]:
    local = target_ids.long() - vocab_start
    on_shard = (local >= 0) & (local < vocab)
    return local.clamp(0, vocab - 1), on_shard


@torch.no_grad()
def stats_torch(
    logits: Tensor, target_ids: Tensor, inv_temp: float, vocab_start: int = 0, chunk_rows: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Row max m, sum exp(x - m), target logit (0 when the target is not in this vocab shard); x = logits * inv_temp."""
    t, v = logits.shape
    rows = chunk_rows or default_chunk_rows(t, v)
    m = torch.empty(t, dtype=torch.float32, device=logits.device)
    s = torch.empty_like(m)
    tgt = torch.empty_like(m)
    local, on_shard = _local_targets(target_ids, vocab_start, v)
    for a in range(0, t, rows):
        b = min(a + rows, t)
        z = logits[a:b].to(torch.float32) * inv_temp  # always a fresh buffer: safe to overwrite below
        mc = z.amax(dim=1)
        tgt[a:b] = torch.where(on_shard[a:b], z.gather(1, local[a:b, None]).squeeze(1), 0.0)
        s[a:b] = z.sub_(mc[:, None]).exp_().sum(dim=1)
        m[a:b] = mc
    return m, s, tgt


@torch.no_grad()
def grad_torch(
    logits: Tensor,
    target_ids: Tensor,
    m: Tensor,
    log_s: Tensor,
    g: Tensor,
    inv_temp: float,
    vocab_start: int = 0,
    out: Optional[Tensor] = None,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """d/dlogits of sum_t g[t] * logp[t]: g[t] * inv_temp * (onehot(target) - softmax(logits * inv_temp)).

    `out` may be `logits` itself (in place): each chunk is read completely before it is written.
    """
    t, v = logits.shape
    rows = chunk_rows or default_chunk_rows(t, v)
    out = torch.empty_like(logits) if out is None else out
    local, on_shard = _local_targets(target_ids, vocab_start, v)
    gs = g.to(torch.float32) * inv_temp
    for a in range(0, t, rows):
        b = min(a + rows, t)
        z = logits[a:b].to(torch.float32) * inv_temp
        z.sub_(m[a:b, None]).sub_(log_s[a:b, None]).exp_().mul_(-gs[a:b, None])
        z.scatter_add_(1, local[a:b, None], torch.where(on_shard[a:b], gs[a:b], 0.0)[:, None])
        out[a:b].copy_(z)
    return out
