"""Chunked torch primitives for the O(T*V) part (the CPU path, and the fallback anywhere).

Rows are processed `chunk_rows` at a time through one reused fp32 work buffer, so temporaries are
O(chunk_rows * V) (at most 64 MiB by default) and never [T, V]; the only [T, V] buffer is the logits gradient itself
(fp32 logits: computed directly in the output, which `out=logits` makes the logits buffer).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

# Work buffer per chunk, in fp32 elements: at most 16 chunks (every op is one OpenMP region; many small
# regions stall badly when the CPU is shared), at least 4 MiB, at most 64 MiB.
MIN_CHUNK_ELEMS, MAX_CHUNK_ELEMS, MAX_CHUNKS = 1 << 20, 1 << 24, 16


def default_chunk_rows(num_rows: int, vocab: int) -> int:
    v = max(vocab, 1)
    rows = max(-(-num_rows // MAX_CHUNKS), MIN_CHUNK_ELEMS // v)
    return max(1, min(num_rows, rows, max(1, MAX_CHUNK_ELEMS // v)))


def _local_targets(target_ids: Tensor, vocab_start: int, vocab: int) -> tuple[Tensor, Tensor]:
    local = target_ids.long() - vocab_start
    on_shard = (local >= 0) & (local < vocab)
    return local.clamp(0, vocab - 1), on_shard


def _fp32_rows(x: Tensor) -> bool:
    return x.dtype == torch.float32 and x.stride(-1) == 1


@torch.no_grad()
def stats_torch(
    logits: Tensor,
    target_ids: Tensor,
    inv_temp: float,
    vocab_start: int = 0,
    chunk_rows: Optional[int] = None,
    overwrite: bool = False,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row max m, sum exp(x - m), target logit (0 when the target is not in this vocab shard); x = logits * inv_temp.

    overwrite: `logits` is a private temporary (the fused-linear chunk): fp32 row-major logits then hold
    the exp pass themselves, no work buffer (same ops, same results; the logits are garbage afterwards).
    """
    t, v = logits.shape
    rows = chunk_rows or default_chunk_rows(t, v)
    local, on_shard = _local_targets(target_ids, vocab_start, v)
    m = logits.amax(dim=1).to(torch.float32)  # one streaming pass, no temporaries
    tgt = torch.where(on_shard, logits.gather(1, local[:, None]).squeeze(1).to(torch.float32) * inv_temp, 0.0)
    s = torch.empty_like(m)
    direct = overwrite and _fp32_rows(logits)
    buf = None if direct else torch.empty(min(rows, t), v, dtype=torch.float32, device=logits.device)
    for a in range(0, t, rows):
        b = min(a + rows, t)
        z = logits[a:b] if direct else buf[: b - a]
        torch.sub(logits[a:b], m[a:b, None], out=z)  # exact for fp32: x - max
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        torch.sum(z.exp_(), dim=1, out=s[a:b])
    return m * inv_temp, s, tgt


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

    m, log_s: row max of logits * inv_temp and log sum exp(logits * inv_temp - m). `out` may be `logits`
    itself (in place): each chunk is read completely before it is written.
    """
    t, v = logits.shape
    rows = chunk_rows or default_chunk_rows(t, v)
    out = torch.empty_like(logits) if out is None else out
    local, on_shard = _local_targets(target_ids, vocab_start, v)
    gs = g.to(torch.float32) * inv_temp
    add = torch.where(on_shard, gs, 0.0)[:, None]
    m_raw = m / inv_temp  # max of the unscaled row (exact when inv_temp == 1)
    direct = out.dtype == torch.float32 and out.stride(-1) == 1  # compute straight into the output
    buf = None if direct else torch.empty(min(rows, t), v, dtype=torch.float32, device=logits.device)
    for a in range(0, t, rows):
        b = min(a + rows, t)
        z = out[a:b] if direct else buf[: b - a]
        torch.sub(logits[a:b], m_raw[a:b, None], out=z)
        if inv_temp != 1.0:
            z.mul_(inv_temp)
        z.sub_(log_s[a:b, None]).exp_().mul_(-gs[a:b, None])  # -g * softmax
        z.scatter_add_(1, local[a:b, None], add[a:b])
        if not direct:
            out[a:b].copy_(z)
    return out


# ---------------------------------------------------------------------------------------------------------
# Unsharded vocabulary: ATen's fused (log_)softmax kernels per chunk are ~2x faster on CPU than the
# sub/exp/sum sequence above (one vectorised pass per row instead of four ops), and need no saved stats:
# backward recomputes the softmax of its chunk.
# ---------------------------------------------------------------------------------------------------------


def _scaled_fp32(x: Tensor, inv_temp: float) -> Tensor:
    if inv_temp != 1.0:
        return x.to(torch.float32) * inv_temp
    return x.to(torch.float32)  # no copy for fp32


@torch.no_grad()
def logp_local_torch(
    logits: Tensor, target_ids: Tensor, inv_temp: float, chunk_rows: Optional[int] = None, overwrite: bool = False
) -> Tensor:
    """log_softmax(logits * inv_temp)[t, target[t]] (0 where target < 0), fp32 [T].

    overwrite: as in stats_torch (fp32 row-major logits become the log-softmax: no work buffer, same result).
    """
    t, v = logits.shape
    rows = chunk_rows or default_chunk_rows(t, v)
    local, valid = _local_targets(target_ids, 0, v)
    logp = torch.empty(t, dtype=torch.float32, device=logits.device)
    direct = overwrite and _fp32_rows(logits)
    buf = None if direct else torch.empty(min(rows, t), v, dtype=torch.float32, device=logits.device)
    for a in range(0, t, rows):
        b = min(a + rows, t)
        if direct:
            z = logits[a:b]
            x = z.mul_(inv_temp) if inv_temp != 1.0 else z  # (ATen's log_softmax reads a row before writing it)
        else:
            z, x = buf[: b - a], _scaled_fp32(logits[a:b], inv_temp)
        torch._log_softmax(x, 1, False, out=z)
        torch.gather(z, 1, local[a:b, None], out=logp[a:b, None])
    return torch.where(valid, logp, 0.0)


@torch.no_grad()
def grad_local_torch(
    logits: Tensor,
    target_ids: Tensor,
    g: Tensor,
    inv_temp: float,
    out: Optional[Tensor] = None,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """Same as grad_torch for an unsharded vocabulary; `out` may be `logits` (in place)."""
    t, v = logits.shape
    rows = chunk_rows or default_chunk_rows(t, v)
    out = torch.empty_like(logits) if out is None else out
    local, valid = _local_targets(target_ids, 0, v)
    gs = g.to(torch.float32) * inv_temp
    add = torch.where(valid, gs, 0.0)[:, None]
    direct = _fp32_rows(out)
    # in place: scale the chunk where it lies instead of into a chunk-sized copy (same values)
    scale_in_place = direct and out is logits and inv_temp != 1.0
    buf = None if direct else torch.empty(min(rows, t), v, dtype=torch.float32, device=logits.device)
    for a in range(0, t, rows):
        b = min(a + rows, t)
        z = out[a:b] if direct else buf[: b - a]
        x = z.mul_(inv_temp) if scale_in_place else _scaled_fp32(logits[a:b], inv_temp)
        # (for in-place fp32, x is z itself: ATen's softmax reads each row before writing it)
        torch._softmax(x, 1, False, out=z)
        z.mul_(-gs[a:b, None]).scatter_add_(1, local[a:b, None], add[a:b])
        if not direct:
            out[a:b].copy_(z)
    return out
