"""Fused linear logprobs: hidden [T, H] x lm_head weight [V_local, H] in row chunks, never [T, V].

Forward: per chunk, logits_c = h_c W^T, then the backend's streaming softmax stats; saves [T] stats only.
Backward: recomputes logits_c, turns it into dlogits_c in place, then dh_c = dlogits_c W and
dW += dlogits_c^T h_c. That is 4 matmuls (8*T*H*V FLOPs) for fwd+bwd and a peak of one logits chunk.
Tensor parallel: W is vocab-sharded, hidden replicated; dh is all-reduced over the group here, so pass
the hidden states *before* Megatron's copy-to-tensor-parallel-region (or do not all-reduce twice).
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.distributed as dist

from .logprobs import finish_logp, primitives
from .tp import tp_info


def default_linear_chunk_rows(num_rows: int, hidden: int, vocab: int) -> int:
    # One logits chunk about the size of the hidden states (Liger's rule): ceil(V/H) chunks.
    n_chunks = max(1, math.ceil(vocab / max(hidden, 1)))
    return max(1, math.ceil(num_rows / n_chunks))


class LinearLogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, target_ids, temperature: float, tp_group, backend: str,
                chunk_rows: Optional[int]):
        t = hidden.shape[0]
        v = weight.shape[0]
        rows = chunk_rows or default_linear_chunk_rows(t, hidden.shape[1], v)
        stats, _ = primitives(backend)
        group, rank, _ = tp_info(tp_group)
        inv_temp, vocab_start = 1.0 / temperature, rank * v
        m = torch.empty(t, dtype=torch.float32, device=hidden.device)
        s, tgt = torch.empty_like(m), torch.empty_like(m)
        wt = weight.t()
        with torch.no_grad():
            for a in range(0, t, rows):
                b = min(a + rows, t)
                z = hidden[a:b] @ wt
                m[a:b], s[a:b], tgt[a:b] = stats(z, target_ids[a:b], inv_temp, vocab_start, b - a)
        logp, m, log_s = finish_logp(m, s, tgt, target_ids, group)
        ctx.save_for_backward(hidden, weight, target_ids, m, log_s)
        ctx.cfg = (inv_temp, vocab_start, backend, rows, group)
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        hidden, weight, target_ids, m, log_s = ctx.saved_tensors
        inv_temp, vocab_start, backend, rows, group = ctx.cfg
        _, grad = primitives(backend)
        g = torch.where(target_ids >= 0, dlogp.float(), 0.0)
        need_h, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        dh = torch.empty_like(hidden) if need_h else None
        # dW accumulates in the weight's dtype across chunks (as Liger does): no fp32 [V, H] copy.
        dw = torch.zeros_like(weight) if need_w else None
        wt = weight.t()
        t = hidden.shape[0]
        for a in range(0, t, rows):
            b = min(a + rows, t)
            hc = hidden[a:b]
            z = hc @ wt
            grad(z, target_ids[a:b], m[a:b], log_s[a:b], g[a:b], inv_temp, vocab_start, out=z, chunk_rows=b - a)
            if need_h:
                torch.mm(z, weight, out=dh[a:b])
            if need_w:
                dw.addmm_(z.t(), hc)
        if need_h and group is not None:
            dist.all_reduce(dh, group=group)
        return dh, dw, None, None, None, None, None
