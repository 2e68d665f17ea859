"""Fused linear logprobs: hidden [T, H] x lm_head weight [V_local, H] in row chunks, never [T, V].

Forward: per chunk, logits_c = h_c W^T, then the backend's streaming softmax stats; saves [T] stats only
(torch backend, unsharded fp32: the chunk's log-softmax instead, and backward recomputes its softmax).
Backward: recomputes logits_c, turns it into dlogits_c in place, then dh_c = dlogits_c W and
dW += dlogits_c^T h_c. That is 4 matmuls (8*T*H*V FLOPs) for fwd+bwd and a peak of one logits chunk
(sized by a memory budget, see DEFAULT_LINEAR_CHUNK_BYTES).
Tensor parallel: W is vocab-sharded, hidden replicated; dh is all-reduced over the group here, so pass
the hidden states *before* Megatron's copy-to-tensor-parallel-region (or do not all-reduce twice).
"""

from __future__ import annotations

import os
from functools import partial
from typing import Optional

import torch
import torch.distributed as dist

from . import torch_ops
from .logprobs import finish_logp, primitives
from .tp import tp_info


# Bytes of one fp32 logits chunk [rows, V_local]: the only O(rows * V) temporary (the softmax work runs
# inside it). Every chunk streams (and BLAS packs) all of W for three matmuls, so small chunks are bound
# by W: Liger's V/H rule (17-row chunks at V=32000, H=256) took 3x the time on CPU, 128 rows ~20% more
# than 256, while 512 rows save only ~4% more for twice the memory (bench/bench_liger.py: T=2048,
# V=32000, H=256, fp32, 2 cores). CPU: 32 MiB = 262 rows there (65 at V=128k); extra memory is then
# dW + dh + one chunk, 64 MiB (Liger's chunked GRPO loss: 104 MiB).
# GPUs need a few hundred rows for the matmul to outrun the weight reads (rows ~ FLOP/byte of the chip):
# 256 MiB keeps real vocabularies (128k-152k) at 400-500 rows, about what the V/H rule gave (not measured).
DEFAULT_LINEAR_CHUNK_BYTES = 32 << 20
DEFAULT_LINEAR_CHUNK_BYTES_GPU = 256 << 20
CHUNK_BYTES_ENV = "SGLGYM_LINEAR_CHUNK_BYTES"  # overrides both defaults (chunk_rows= overrides the budget)


def linear_chunk_bytes(device: Optional[torch.device] = None) -> int:
    env = os.environ.get(CHUNK_BYTES_ENV)  # read per call: a process (or a test) may change it at any time
    if env:
        return int(env)
    on_gpu = device is not None and device.type != "cpu"
    return DEFAULT_LINEAR_CHUNK_BYTES_GPU if on_gpu else DEFAULT_LINEAR_CHUNK_BYTES


def default_linear_chunk_rows(num_rows: int, vocab: int, budget_bytes: Optional[int] = None) -> int:
    """Rows per chunk so that one fp32 logits chunk [rows, vocab] fits in `budget_bytes` (default: the CPU
    budget, see linear_chunk_bytes), clamped to [1, num_rows]."""
    budget = linear_chunk_bytes() if budget_bytes is None else budget_bytes
    rows = budget // (max(vocab, 1) * 4)
    return max(1, min(num_rows, rows))


def _fused_softmax(backend: str, group, hidden) -> bool:
    # torch backend, whole vocabulary here, fp32 chunks: ATen's fused (log_)softmax per chunk, in the chunk
    # itself (~2x faster than the stats/grad op sequence, see torch_ops), and backward needs no saved stats.
    # (A bf16 chunk would need an fp32 copy for that; the stats path upcasts into one work buffer instead.)
    return backend == "torch" and group is None and hidden.dtype == torch.float32


def _chunk_stats(backend: str):
    # The logits chunk is a private temporary: the torch stats may overwrite it instead of taking a
    # second chunk-sized work buffer (Triton streams it without one anyway).
    stats, _ = primitives(backend)
    return partial(stats, overwrite=True) if backend == "torch" else stats


def _chunk_buffer(hidden, weight, rows: int):
    # One logits buffer reused by every chunk: `z = h_c @ W^T` per chunk would keep two chunks alive
    # (the old z is freed only after the new one is assigned) and fault in fresh pages each time.
    return torch.empty(min(rows, hidden.shape[0]), weight.shape[0], dtype=hidden.dtype, device=hidden.device)


def _logits_chunks(hidden, weight, rows: int):
    """Yields (a, b, logits of rows a:b) in one reused buffer: each chunk is gone when the next comes."""
    wt, buf = weight.t(), _chunk_buffer(hidden, weight, rows)
    for a in range(0, hidden.shape[0], rows):
        b = min(a + rows, hidden.shape[0])
        yield a, b, torch.mm(hidden[a:b], wt, out=buf[: b - a])


class LinearLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target_ids, temperature: float, tp_group, backend: str,
                chunk_rows: Optional[int]):
        t = hidden.shape[0]
        v = weight.shape[0]
        rows = chunk_rows or default_linear_chunk_rows(t, v, linear_chunk_bytes(hidden.device))
        group, rank, _ = tp_info(tp_group)
        inv_temp, vocab_start = 1.0 / temperature, rank * v
        fused = _fused_softmax(backend, group, hidden)
        ctx.cfg = (inv_temp, vocab_start, backend, rows, group, fused)
        if fused:
            logp = torch.empty(t, dtype=torch.float32, device=hidden.device)
            with torch.no_grad():
                for a, b, z in _logits_chunks(hidden, weight, rows):
                    logp[a:b] = torch_ops.logp_local_torch(z, target_ids[a:b], inv_temp, b - a, overwrite=True)
            ctx.save_for_backward(hidden, weight, target_ids)
            return logp
        stats = _chunk_stats(backend)
        m = torch.empty(t, dtype=torch.float32, device=hidden.device)
        s, tgt = torch.empty_like(m), torch.empty_like(m)
        with torch.no_grad():
            for a, b, z in _logits_chunks(hidden, weight, rows):
                m[a:b], s[a:b], tgt[a:b] = stats(z, target_ids[a:b], inv_temp, vocab_start, b - a)
        logp, m, log_s = finish_logp(m, s, tgt, target_ids, group)
        ctx.save_for_backward(hidden, weight, target_ids, m, log_s)
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        hidden, weight, target_ids = ctx.saved_tensors[:3]
        inv_temp, vocab_start, backend, rows, group, fused = ctx.cfg
        g = torch.where(target_ids >= 0, dlogp.float(), 0.0)
        if fused:
            def dlogits(z, a, b):  # in place: z becomes d loss / d logits of rows a:b
                torch_ops.grad_local_torch(z, target_ids[a:b], g[a:b], inv_temp, out=z, chunk_rows=b - a)
        else:
            m, log_s = ctx.saved_tensors[3:]
            _, grad = primitives(backend)

            def dlogits(z, a, b):
                grad(z, target_ids[a:b], m[a:b], log_s[a:b], g[a:b], inv_temp, vocab_start, out=z, chunk_rows=b - a)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        # dW accumulates in the weight's dtype across chunks (as Liger does): no fp32 [V, H] copy.
        dw = torch.zeros_like(weight) if need_w else None
        for a, b, z in _logits_chunks(hidden, weight, rows):
            dlogits(z, a, b)
            if need_h:
                torch.mm(z, weight, out=dh[a:b])
            if need_w:
                dw.addmm_(z.t(), hidden[a:b])
        if need_h and group is not None:
            dist.all_reduce(dh, group=group)
        return dh, dw, None, None, None, None, None
