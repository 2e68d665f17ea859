"""Per-token logprobs from logits [T, V_local] as an autograd.Function; forward saves only [T] stats.

Backends share one contract (stats -> combine over TP ranks -> logp; grad from row max + log sum-exp):
"triton" launches the kernels in fused_loss.py, "torch" the chunked loops in torch_ops.py.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import Tensor

from . import torch_ops
from .tp import combine_lse, tp_info


def primitives(backend: str) -> tuple[Callable, Callable]:
    if backend == "torch":
        return torch_ops.stats_torch, torch_ops.grad_torch
    if backend == "triton":
        from . import fused_loss as tk  # imported late: TRITON_INTERPRET must be set first on CPU

        return tk.stats_triton, tk.grad_triton
    raise ValueError(f"backend must be 'torch' or 'triton', got {backend!r}")


def finish_logp(m: Tensor, s: Tensor, tgt: Tensor, target_ids: Tensor, group) -> tuple[Tensor, Tensor, Tensor]:
    """-> (logp, row max, log sum-exp): what backward needs, O(T)."""
    m, log_s, tgt = combine_lse(m, s, tgt, group)
    return torch.where(target_ids >= 0, (tgt - m) - log_s, 0.0), m, log_s


class LogprobFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, target_ids, temperature: float, tp_group, backend: str, inplace: bool,
                chunk_rows: Optional[int]):
        if logits.stride(-1) != 1:
            logits = logits.contiguous()  # (in-place backward then lands in this copy: harmless, just not free)
        group, rank, _ = tp_info(tp_group)
        inv_temp = 1.0 / temperature
        vocab_start = rank * logits.shape[1]
        ctx.cfg = (inv_temp, vocab_start, backend, inplace, chunk_rows)
        ctx.local = backend == "torch" and group is None
        if ctx.local:  # fused ATen log_softmax per chunk; backward recomputes the chunk's softmax
            ctx.save_for_backward(logits, target_ids)
            return torch_ops.logp_local_torch(logits, target_ids, inv_temp, chunk_rows)
        stats, _ = primitives(backend)
        m, s, tgt = stats(logits, target_ids, inv_temp, vocab_start, chunk_rows)
        logp, m, log_s = finish_logp(m, s, tgt, target_ids, group)
        ctx.save_for_backward(logits, target_ids, m, log_s)
        return logp

    @staticmethod
    def backward(ctx, dlogp):
        inv_temp, vocab_start, backend, inplace, chunk_rows = ctx.cfg
        logits, target_ids = ctx.saved_tensors[:2]
        g = torch.where(target_ids >= 0, dlogp.float(), 0.0)
        out = logits if inplace else None
        if ctx.local:
            dlogits = torch_ops.grad_local_torch(logits, target_ids, g, inv_temp, out=out, chunk_rows=chunk_rows)
        else:
            m, log_s = ctx.saved_tensors[2:]
            _, grad = primitives(backend)
            dlogits = grad(logits, target_ids, m, log_s, g, inv_temp, vocab_start, out=out, chunk_rows=chunk_rows)
        return dlogits, None, None, None, None, None, None
