"""Triton GRPO loss from logits (kernels and the autograd.Functions that launch them, Liger `ops/` style).

Layout: logits [T, V_local] for packed tokens (THD), one program per token row.
  forward : one streaming pass over the row (online softmax) -> max, log sum-exp, logprob; with FUSE_LOSS the
            per-token loss and d loss / d logp are computed in the epilogue. Saves only [T] vectors.
  backward: one more pass: dlogits = coef * (onehot - softmax) / temperature, optionally written into the
            logits buffer itself. Rows with coef == 0 (masked: prompts, padding) skip their loads.
Import this module only after TRITON_INTERPRET is set when running on CPU.
"""

from __future__ import annotations

import os
from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from .config import GRPOLossConfig
from .online_softmax import online_softmax_update

KL_CODE = {None: 0, "k1": 1, "k2": 2, "k3": 3}
FLAG_CLIP_LOW, FLAG_CLIP_HIGH, FLAG_DUAL = 1, 2, 4


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def block_v(vocab: int) -> int:
    # The interpreter costs ~1 ms per (program x loop iteration) whatever the block: use one big block.
    cap = 1 << 15 if interpreting() else 4096
    return min(triton.next_power_of_2(max(vocab, 16)), cap)


def _warps(block: int) -> int:
    return 1 if interpreting() else max(1, min(16, block // 512))


# ---------------------------------------------------------------------------------------------------------
# Per-token policy-loss terms (shared by the fused logits kernel and the element-wise kernel)
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _pg_terms(
    logp, old, adv, tis, ref, seq_lr,
    eps_low, eps_high, dual_c, beta, clamp_c, kl_clamp,
    SEQ: tl.constexpr, DUAL: tl.constexpr, HAS_TIS: tl.constexpr, KL: tl.constexpr,
):
    """Unweighted loss, d loss / d logp, ratio, kl, clip flags. Works on scalars and on blocks."""
    if SEQ:
        lr = seq_lr  # GSPO-token: value of the sequence ratio, gradient flows through this token only
    else:
        lr = logp - old
    inside = (lr >= -clamp_c) & (lr <= clamp_c)
    ratio = tl.exp(tl.minimum(tl.maximum(lr, -clamp_c), clamp_c))
    pg1 = -adv * ratio
    pg2 = -adv * tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
    # pg2 > pg1 only when the ratio is outside the clip range on the side that matters: gradient 0.
    clipped = pg2 > pg1
    pg = tl.where(clipped, pg2, pg1)
    dpg = tl.where(clipped, 0.0, tl.where(inside, -adv * ratio, 0.0))
    flags = (clipped & (adv < 0)).to(tl.int32) * 1 + (clipped & (adv > 0)).to(tl.int32) * 2
    if DUAL:
        pg3 = -adv * dual_c
        is_dual = (adv < 0) & (pg3 < pg)
        pg = tl.where(is_dual, pg3, pg)
        dpg = tl.where(is_dual, 0.0, dpg)
        flags = flags + is_dual.to(tl.int32) * 4
    if HAS_TIS:
        pg = pg * tis
        dpg = dpg * tis
    loss = pg
    dloss = dpg
    kl = logp * 0.0
    if KL != 0:
        d = ref - logp  # log(pi_ref / pi); d d / d logp = -1
        kin = (d >= -clamp_c) & (d <= clamp_c)
        d = tl.minimum(tl.maximum(d, -clamp_c), clamp_c)
        if KL == 1:
            kl = -d
            dkl = tl.where(kin, 1.0, 0.0)
        elif KL == 2:
            kl = 0.5 * d * d
            dkl = tl.where(kin, -d, 0.0)
        else:
            e = tl.exp(d)
            raw = e - d - 1.0
            kl = tl.minimum(raw, kl_clamp)
            dkl = tl.where(kin & (raw <= kl_clamp), 1.0 - e, 0.0)
        loss = loss + beta * kl
        dloss = dloss + beta * dkl
    return loss, dloss, ratio, kl, flags


# ---------------------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------------------


@triton.jit
def _fwd_kernel(
    logits_ptr, stride_row, target_ptr, V, vocab_start, inv_temp,
    # FUSE_LOSS=False outputs: per-row max, sum-exp, target logit (combined across TP ranks by the caller)
    m_ptr, s_ptr, tgt_ptr,
    # FUSE_LOSS=True inputs / outputs
    old_ptr, adv_ptr, w_ptr, tis_ptr, ref_ptr,
    mx_ptr, logs_ptr, logp_ptr, loss_ptr, coef_ptr, ratio_ptr, kl_ptr, flags_ptr,
    eps_low, eps_high, dual_c, beta, clamp_c, kl_clamp,
    FUSE_LOSS: tl.constexpr, ON_POLICY: tl.constexpr, DUAL: tl.constexpr, HAS_TIS: tl.constexpr,
    KL: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    if FUSE_LOSS:
        w = tl.load(w_ptr + row)
        n_v = tl.where(w != 0, V, 0)  # masked rows: no pass over the vocabulary at all
    else:
        n_v = V
    m = tl.full([], float("-inf"), tl.float32)
    s = tl.full([], 0.0, tl.float32)
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, n_v, BLOCK_V):
        offs = start + cols
        x = tl.load(base + offs, mask=offs < V, other=float("-inf")).to(tl.float32) * inv_temp
        m, s = online_softmax_update(m, s, x)
    y = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    on_shard = (y >= 0) & (y < V)
    tgt = tl.load(base + tl.where(on_shard, y, 0), mask=on_shard, other=0.0).to(tl.float32) * inv_temp
    tgt = tl.where(on_shard, tgt, 0.0)
    if FUSE_LOSS:
        active = w != 0
        # lse kept as (max, log sum): x - max is exact in fp32 even for logits ~1e4, max + log s is not.
        m = tl.where(active, m, 0.0)
        log_s = tl.log(tl.where(active, s, 1.0))
        logp = tl.where(active, (tgt - m) - log_s, 0.0)
        if ON_POLICY:
            old = logp
        else:
            old = tl.load(old_ptr + row).to(tl.float32)
        adv = tl.load(adv_ptr + row).to(tl.float32)
        tis = 1.0
        if HAS_TIS:
            tis = tl.load(tis_ptr + row).to(tl.float32)
        ref = 0.0
        if KL != 0:
            ref = tl.load(ref_ptr + row).to(tl.float32)
        loss, dloss, ratio, kl, flags = _pg_terms(
            logp, old, adv, tis, ref, 0.0, eps_low, eps_high, dual_c, beta, clamp_c, kl_clamp,
            False, DUAL, HAS_TIS, KL,
        )
        tl.store(mx_ptr + row, m)
        tl.store(logs_ptr + row, log_s)
        tl.store(logp_ptr + row, logp)
        tl.store(loss_ptr + row, tl.where(active, loss * w, 0.0))
        tl.store(coef_ptr + row, tl.where(active, dloss * w, 0.0))
        tl.store(ratio_ptr + row, tl.where(active, ratio, 1.0))
        tl.store(kl_ptr + row, tl.where(active, kl, 0.0))
        tl.store(flags_ptr + row, tl.where(active, flags, 0))
    else:
        tl.store(m_ptr + row, m)
        tl.store(s_ptr + row, s)
        tl.store(tgt_ptr + row, tgt)


@triton.jit
def _bwd_kernel(
    logits_ptr, stride_row, grad_ptr, grad_stride, target_ptr, mx_ptr, logs_ptr, coef_ptr, scale_ptr,
    V, vocab_start, inv_temp,
    HAS_SCALE: tl.constexpr, BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    base = logits_ptr + row * stride_row
    gbase = grad_ptr + row * grad_stride
    g = tl.load(coef_ptr + row).to(tl.float32)
    if HAS_SCALE:
        g = g * tl.load(scale_ptr).to(tl.float32)
    g = g * inv_temp
    n_v = tl.where(g != 0, V, 0)  # coef 0 (masked rows): write zeros without reading the row
    m = tl.load(mx_ptr + row)
    log_s = tl.load(logs_ptr + row)
    y = tl.load(target_ptr + row).to(tl.int64) - vocab_start
    cols = tl.arange(0, BLOCK_V)
    for start in range(0, V, BLOCK_V):
        offs = start + cols
        live = offs < n_v
        x = tl.load(base + offs, mask=live, other=float("-inf")).to(tl.float32) * inv_temp
        p = tl.exp((x - m) - log_s)
        d = tl.where(offs == y, g - g * p, -g * p)
        d = tl.where(live, d, 0.0)
        tl.store(gbase + offs, d.to(grad_ptr.dtype.element_ty), mask=offs < V)


@triton.jit
def _token_loss_kernel(
    logp_ptr, old_ptr, adv_ptr, w_ptr, tis_ptr, ref_ptr, seqlr_ptr,
    loss_ptr, coef_ptr, ratio_ptr, kl_ptr, flags_ptr, T,
    eps_low, eps_high, dual_c, beta, clamp_c, kl_clamp,
    SEQ: tl.constexpr, DUAL: tl.constexpr, HAS_TIS: tl.constexpr, KL: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    inb = offs < T
    w = tl.load(w_ptr + offs, mask=inb, other=0.0)
    active = w != 0
    logp = tl.load(logp_ptr + offs, mask=inb, other=0.0)
    old = tl.load(old_ptr + offs, mask=inb, other=0.0)
    adv = tl.load(adv_ptr + offs, mask=inb, other=0.0)
    tis = 1.0
    if HAS_TIS:
        tis = tl.load(tis_ptr + offs, mask=inb, other=1.0)
    ref = 0.0
    if KL != 0:
        ref = tl.load(ref_ptr + offs, mask=inb, other=0.0)
    seq_lr = 0.0
    if SEQ:
        seq_lr = tl.load(seqlr_ptr + offs, mask=inb, other=0.0)
    loss, dloss, ratio, kl, flags = _pg_terms(
        logp, old, adv, tis, ref, seq_lr, eps_low, eps_high, dual_c, beta, clamp_c, kl_clamp,
        SEQ, DUAL, HAS_TIS, KL,
    )
    tl.store(loss_ptr + offs, tl.where(active, loss * w, 0.0), mask=inb)
    tl.store(coef_ptr + offs, tl.where(active, dloss * w, 0.0), mask=inb)
    tl.store(ratio_ptr + offs, tl.where(active, ratio, 1.0), mask=inb)
    tl.store(kl_ptr + offs, tl.where(active, kl, 0.0), mask=inb)
    tl.store(flags_ptr + offs, tl.where(active, flags, 0), mask=inb)


# ---------------------------------------------------------------------------------------------------------
# Launchers (same contract as torch_ops.stats_torch / grad_torch)
# ---------------------------------------------------------------------------------------------------------


def _row_major(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


def _loss_params(cfg: GRPOLossConfig) -> dict:
    return dict(
        eps_low=float(cfg.eps_low), eps_high=float(cfg.eps_high),
        dual_c=float(cfg.dual_clip_c or 0.0), beta=float(cfg.beta),
        clamp_c=float(cfg.log_ratio_clamp), kl_clamp=float(cfg.kl_clamp),
    )


@torch.no_grad()
def stats_triton(
    logits: Tensor, target_ids: Tensor, inv_temp: float, vocab_start: int = 0, chunk_rows: Optional[int] = None
) -> tuple[Tensor, Tensor, Tensor]:
    logits = _row_major(logits)
    t, v = logits.shape
    m = torch.empty(t, dtype=torch.float32, device=logits.device)
    s, tgt = torch.empty_like(m), torch.empty_like(m)
    if t == 0:
        return m, s, tgt
    bv = block_v(v)
    d = m  # placeholder for the pointers FUSE_LOSS=False never touches
    _fwd_kernel[(t,)](
        logits, logits.stride(0), target_ids.contiguous(), v, vocab_start, inv_temp,
        m, s, tgt,
        d, d, d, d, d, d, d, d, d, d, d, d, d,
        0.0, 0.0, 0.0, 0.0, 0.0, 0.0,
        FUSE_LOSS=False, ON_POLICY=False, DUAL=False, HAS_TIS=False, KL=0, BLOCK_V=bv, num_warps=_warps(bv),
    )
    return m, s, tgt


@torch.no_grad()
def grad_triton(
    logits: Tensor,
    target_ids: Tensor,
    m: Tensor,
    log_s: Tensor,
    g: Tensor,
    inv_temp: float,
    vocab_start: int = 0,
    out: Optional[Tensor] = None,
    chunk_rows: Optional[int] = None,
    scale: Optional[Tensor] = None,
) -> Tensor:
    """dlogits[t] = g[t] * scale * inv_temp * (onehot - softmax); `out` may alias `logits` (in place)."""
    logits = _row_major(logits)
    t, v = logits.shape
    out = torch.empty_like(logits) if out is None else out
    if t == 0:
        return out
    assert out.stride(-1) == 1
    bv = block_v(v)
    _bwd_kernel[(t,)](
        logits, logits.stride(0), out, out.stride(0), target_ids.contiguous(), m.contiguous(), log_s.contiguous(),
        g.to(torch.float32).contiguous(), g if scale is None else scale.to(torch.float32).contiguous(),
        v, vocab_start, inv_temp,
        HAS_SCALE=scale is not None, BLOCK_V=bv, num_warps=_warps(bv),
    )
    return out


# ---------------------------------------------------------------------------------------------------------
# autograd.Functions
# ---------------------------------------------------------------------------------------------------------


class FusedGRPOLossFn(torch.autograd.Function):
    """Whole token-level loss in one pass over the logits (no tensor parallelism).

    Returns (loss, logp, ratio, kl, flags); only `loss` is differentiable.
    """

    @staticmethod
    def forward(ctx, logits, target_ids, old, adv, w, tis, ref, cfg: GRPOLossConfig, inplace: bool):
        logits = _row_major(logits)
        t, v = logits.shape
        f32 = dict(dtype=torch.float32, device=logits.device)
        mx, log_s, logp, loss_t, coef, ratio, kl = (torch.empty(t, **f32) for _ in range(7))
        flags = torch.empty(t, dtype=torch.int32, device=logits.device)
        inv_temp = 1.0 / cfg.temperature
        if t > 0:
            bv = block_v(v)
            _fwd_kernel[(t,)](
                logits, logits.stride(0), target_ids.contiguous(), v, 0, inv_temp,
                mx, mx, mx,
                mx if old is None else old.contiguous(), adv.contiguous(), w.contiguous(),
                mx if tis is None else tis.contiguous(), mx if ref is None else ref.contiguous(),
                mx, log_s, logp, loss_t, coef, ratio, kl, flags,
                **_loss_params(cfg),
                FUSE_LOSS=True, ON_POLICY=old is None, DUAL=cfg.dual_clip_c is not None,
                HAS_TIS=tis is not None, KL=KL_CODE[cfg.kl_type],
                BLOCK_V=bv, num_warps=_warps(bv),
            )
        ctx.save_for_backward(logits, target_ids, mx, log_s, coef)
        ctx.inv_temp, ctx.inplace = inv_temp, inplace
        ctx.mark_non_differentiable(logp, ratio, kl, flags)
        return loss_t.sum(), logp, ratio, kl, flags

    @staticmethod
    def backward(ctx, grad_loss, *_):
        logits, target_ids, mx, log_s, coef = ctx.saved_tensors
        out = logits if ctx.inplace else None
        dlogits = grad_triton(logits, target_ids, mx, log_s, coef, ctx.inv_temp, 0, out=out, scale=grad_loss.reshape(1))
        return dlogits, None, None, None, None, None, None, None, None


class TokenLossFn(torch.autograd.Function):
    """Per-token loss from logprobs [T] (any variant, incl. sequence level); grad w.r.t. logp only."""

    @staticmethod
    def forward(ctx, logp, old, adv, w, tis, ref, seq_lr, cfg: GRPOLossConfig):
        t = logp.shape[0]
        f32 = dict(dtype=torch.float32, device=logp.device)
        loss_t, coef, ratio, kl = (torch.empty(t, **f32) for _ in range(4))
        flags = torch.empty(t, dtype=torch.int32, device=logp.device)
        if t > 0:
            block = min(triton.next_power_of_2(t), 1 << 14 if interpreting() else 1024)
            lp = logp.detach().float().contiguous()
            _token_loss_kernel[(triton.cdiv(t, block),)](
                lp, old.float().contiguous(), adv.float().contiguous(), w.float().contiguous(),
                lp if tis is None else tis.float().contiguous(), lp if ref is None else ref.float().contiguous(),
                lp if seq_lr is None else seq_lr.float().contiguous(),
                loss_t, coef, ratio, kl, flags, t,
                **_loss_params(cfg),
                SEQ=cfg.importance_level == "sequence", DUAL=cfg.dual_clip_c is not None,
                HAS_TIS=tis is not None, KL=KL_CODE[cfg.kl_type],
                BLOCK=block, num_warps=1 if interpreting() else 4,
            )
        ctx.save_for_backward(coef)
        ctx.mark_non_differentiable(ratio, kl, flags)
        return loss_t.sum(), ratio, kl, flags

    @staticmethod
    def backward(ctx, grad_loss, *_):
        (coef,) = ctx.saved_tensors
        return coef * grad_loss, None, None, None, None, None, None, None
