"""Public entry points: group_advantages, token_logprobs, grpo_loss.

backend="auto" -> "triton" for CUDA tensors, "torch" (chunked, bounded memory) otherwise.
backend="triton" on CPU tensors needs TRITON_INTERPRET=1 set before the first call (tests do this).
"""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from . import reference as ref_mod
from .config import GRPOLossConfig
from .fused_linear import LinearLogprobFn
from .logprobs import LogprobFn
from .tp import tp_info

BACKENDS = ("auto", "triton", "torch")


def resolve_backend(backend: str, tensor: Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend != "auto":
        return backend
    if tensor.is_cuda:
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch"
        return "triton"
    return "torch"


def group_advantages(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    baseline: str = "mean",
    std_normalize: bool = True,
    eps: float = 1e-6,
    cu_seqlens: Optional[Tensor] = None,
    num_tokens: Optional[int] = None,
    backend: str = "auto",
) -> Tensor:
    """GRPO advantages: [B] per sequence, or [T] per token when `cu_seqlens` [B+1] (packed) is given.

    baseline "mean" (GRPO) or "loo" (leave-one-out, RLOO/NeMo); std_normalize divides by the unbiased group
    std + eps; groups whose rewards are all equal get 0. num_tokens: T when the packed batch has padding
    past cu_seqlens[-1] (default cu_seqlens[-1]); padding tokens get 0.
    """
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError("rewards and group_ids must both be [B]")
    if cu_seqlens is not None:
        if cu_seqlens.numel() != rewards.shape[0] + 1:
            raise ValueError("cu_seqlens must have B+1 entries")
        if num_tokens is not None and num_tokens < int(cu_seqlens[-1]):
            raise ValueError("num_tokens < cu_seqlens[-1]")
    if resolve_backend(backend, rewards) == "triton":
        from .advantages import group_advantages_triton

        return group_advantages_triton(
            rewards, group_ids, baseline=baseline, std_normalize=std_normalize, eps=eps,
            cu_seqlens=cu_seqlens, num_tokens=num_tokens,
        )
    adv = ref_mod.group_advantages_ref(rewards, group_ids, baseline=baseline, std_normalize=std_normalize, eps=eps)
    adv = adv.to(torch.float32)
    if cu_seqlens is None:
        return adv
    t = int(cu_seqlens[-1]) if num_tokens is None else num_tokens
    return ref_mod.broadcast_to_tokens(adv, cu_seqlens.to(adv.device), t)


def token_logprobs(
    logits: Tensor,
    target_ids: Tensor,
    temperature: float = 1.0,
    tp_group=None,
    *,
    weight: Optional[Tensor] = None,
    backend: str = "auto",
    inplace_backward: bool = False,
    chunk_rows: Optional[int] = None,
) -> Tensor:
    """log_softmax(logits / temperature)[t, target_ids[t]] as fp32 [T], differentiable, O(T) saved.

    logits [T, V] (V_local when vocab-sharded over `tp_group`), or hidden [T, H] with `weight` [V, H]
    (fused linear, never materialises [T, V]). target_ids < 0 give 0.
    """
    backend = resolve_backend(backend, logits)
    if weight is not None:
        return LinearLogprobFn.apply(logits, weight, target_ids, float(temperature), tp_group, backend, chunk_rows)
    return LogprobFn.apply(logits, target_ids, float(temperature), tp_group, backend, inplace_backward, chunk_rows)


def grpo_loss(
    logits: Tensor,
    target_ids: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    config: GRPOLossConfig,
    *,
    weight: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    gen_logprobs: Optional[Tensor] = None,
    tp_group=None,
    backend: str = "auto",
    inplace_backward: bool = False,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    chunk_rows: Optional[int] = None,
    fused: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """GRPO/PPO/GSPO policy loss over packed sequences; returns (scalar loss, metrics of 0-dim tensors).

    logits [T, V] (or hidden [T, H] with `weight` [V, H]; vocab-sharded over `tp_group` if given);
    target_ids [T] (already shifted; < 0 = ignore); old_logprobs [T] (None = on-policy, i.e. the current
    logprobs detached); advantages [T]; loss_mask [T]; cu_seqlens [B+1]; ref_logprobs [T] for the KL term;
    gen_logprobs [T] (the engine's sampling logprobs) for tis_* and token_mult_prob_error.
    inplace_backward: write d loss / d logits into the logits buffer (saves T*V memory; the logits are
    gone afterwards). global_num_tokens / global_num_seqs: denominators across micro-batches and ranks
    (DAPO's global token mean); the default is this call's own count. fused=False forces the two-stage
    Triton path (logprobs, then the element-wise loss kernel); the result is the same.
    """
    cfg = config
    t = target_ids.shape[0]
    if logits.shape[0] != t or advantages.shape[0] != t or loss_mask.shape[0] != t:
        raise ValueError("logits, target_ids, advantages and loss_mask must all have T rows")
    backend = resolve_backend(backend, logits)
    group, _, _ = tp_info(tp_group)
    dev = logits.device
    prep_kw = dict(global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs)

    if (
        backend == "triton" and fused and weight is None and group is None
        and cfg.importance_level == "token" and not (cfg.tis_level is not None and old_logprobs is None)
    ):
        from .fused_loss import FLAG_CLIP_HIGH, FLAG_CLIP_LOW, FLAG_DUAL, FusedGRPOLossFn

        prep = ref_mod.prepare(
            target_ids, loss_mask, cu_seqlens.to(dev), cfg, old_logprobs=old_logprobs, gen_logprobs=gen_logprobs,
            **prep_kw,
        )
        old = None if old_logprobs is None else old_logprobs.float()
        if cfg.kl_type is not None and ref_logprobs is None:
            raise ValueError("kl_type set but ref_logprobs is None")
        ref = ref_logprobs.float() if cfg.kl_type is not None else None
        loss, logp, ratio, kl, flags = FusedGRPOLossFn.apply(
            logits, target_ids, old, advantages.float(), prep.weights, prep.tis, ref, cfg, inplace_backward
        )
        metrics = ref_mod.summarize(
            prep.valid, ratio, (flags & FLAG_CLIP_LOW) != 0, (flags & FLAG_CLIP_HIGH) != 0,
            (flags & FLAG_DUAL) != 0, kl if cfg.kl_type is not None else None, cfg,
            old_logprobs=logp if old is None else old, gen_logprobs=gen_logprobs, tis=prep.tis,
        )
        return loss, metrics

    logp = token_logprobs(
        logits, target_ids, cfg.temperature, tp_group, weight=weight, backend=backend,
        inplace_backward=inplace_backward, chunk_rows=chunk_rows,
    )
    if backend == "torch":
        return ref_mod.grpo_loss_from_logprobs(
            logp, old_logprobs, advantages, loss_mask, cu_seqlens.to(dev), cfg, target_ids=target_ids,
            ref_logprobs=ref_logprobs, gen_logprobs=gen_logprobs, **prep_kw,
        )
    return _two_stage_triton(logp, old_logprobs, advantages, loss_mask, cu_seqlens.to(dev), cfg, target_ids,
                             ref_logprobs, gen_logprobs, prep_kw)


def _two_stage_triton(logp, old_logprobs, advantages, loss_mask, cu_seqlens, cfg, target_ids, ref_logprobs,
                      gen_logprobs, prep_kw):
    from .fused_loss import FLAG_CLIP_HIGH, FLAG_CLIP_LOW, FLAG_DUAL, TokenLossFn

    old = logp.detach() if old_logprobs is None else old_logprobs.float()
    prep = ref_mod.prepare(target_ids, loss_mask, cu_seqlens, cfg, old_logprobs=old, gen_logprobs=gen_logprobs,
                           **prep_kw)
    if cfg.kl_type is not None and ref_logprobs is None:
        raise ValueError("kl_type set but ref_logprobs is None")
    ref = ref_logprobs.float() if cfg.kl_type is not None else None
    seq_lr = ref_mod.seq_mean_log_ratio(logp, old, prep) if cfg.importance_level == "sequence" else None
    loss, ratio, kl, flags = TokenLossFn.apply(logp, old, advantages.float(), prep.weights, prep.tis, ref, seq_lr, cfg)
    metrics = ref_mod.summarize(
        prep.valid, ratio, (flags & FLAG_CLIP_LOW) != 0, (flags & FLAG_CLIP_HIGH) != 0, (flags & FLAG_DUAL) != 0,
        kl if cfg.kl_type is not None else None, cfg, old_logprobs=old, gen_logprobs=gen_logprobs, tis=prep.tis,
    )
    return loss, metrics
