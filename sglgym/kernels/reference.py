"""The GRPO math, once, in plain torch (differentiable through autograd; pass fp64 for a gold reference).

Layout: packed sequences (THD). Token t belongs to sequence b when cu_seqlens[b] <= t < cu_seqlens[b+1];
tokens at or past cu_seqlens[-1] belong to no sequence and never count. `target_ids[t]` is the token whose
logprob is read from logits row t (the caller has already shifted); target_ids < 0 means "ignore".

The O(T) helpers here (sequence index, aggregation weights, mismatch weights, metrics) are also used by the
fast paths, so the only math the kernels re-implement is the O(T*V) softmax part and the per-token loss
terms with their hand-derived gradients -- both tested against this file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from .config import GRPOLossConfig

# ---------------------------------------------------------------------------------------------------------
# Group advantages
# ---------------------------------------------------------------------------------------------------------


def group_advantages_ref(
    rewards: Tensor,
    group_ids: Tensor,
    *,
    baseline: str = "mean",
    std_normalize: bool = True,
    eps: float = 1e-6,
) -> Tensor:
    """Per-sequence advantages [B].

    baseline="mean": A_i = r_i - mean_g.  baseline="loo": A_i = r_i - mean of the *other* members
    = n/(n-1) * (r_i - mean_g).  std_normalize divides by (unbiased group std + eps).
    Groups whose rewards are all equal (this includes singletons) get exactly 0: no learning signal,
    and no 0/eps blow-up from rounding in the mean.
    """
    if baseline not in ("mean", "loo"):
        raise ValueError(f"baseline must be 'mean' or 'loo', got {baseline!r}")
    r = rewards.to(torch.float64)
    _, inv, counts = torch.unique(group_ids, return_inverse=True, return_counts=True)
    g = counts.numel()
    n = counts.to(torch.float64)[inv]
    mean = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inv, r)[inv] / n
    dev = r - mean
    var = torch.zeros(g, dtype=torch.float64, device=r.device).index_add_(0, inv, dev * dev)[inv] / (n - 1).clamp(min=1)
    rmax = torch.full((g,), -math.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inv, r, "amax")
    rmin = torch.full((g,), math.inf, dtype=torch.float64, device=r.device).scatter_reduce(0, inv, r, "amin")
    degenerate = (rmax == rmin)[inv]
    adv = dev if baseline == "mean" else dev * n / (n - 1).clamp(min=1)
    if std_normalize:
        adv = adv / (var.sqrt() + eps)
    adv = torch.where(degenerate, torch.zeros_like(adv), adv)
    out_dtype = rewards.dtype if rewards.is_floating_point() else torch.float32
    return adv.to(out_dtype)


def seq_index(cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """[T] int64 sequence id of each token; B (= len(cu_seqlens) - 1) for tokens outside every sequence."""
    cu = cu_seqlens.to(torch.int64)
    t = torch.arange(num_tokens, device=cu.device, dtype=torch.int64)
    return torch.searchsorted(cu[1:].contiguous(), t, right=True)


def broadcast_to_tokens(values: Tensor, cu_seqlens: Tensor, num_tokens: int) -> Tensor:
    """values[B] -> [T] (0 for tokens outside every sequence)."""
    sid = seq_index(cu_seqlens, num_tokens)
    padded = torch.cat([values, values.new_zeros(1)])
    return padded[sid]


# ---------------------------------------------------------------------------------------------------------
# Logprobs
# ---------------------------------------------------------------------------------------------------------


def token_logprobs_ref(logits: Tensor, target_ids: Tensor, temperature: float = 1.0) -> Tensor:
    """log_softmax(logits / temperature)[t, target_ids[t]] in the logits' dtype; 0 where target < 0."""
    lp = torch.log_softmax(logits / temperature, dim=-1)
    valid = target_ids >= 0
    out = lp.gather(1, target_ids.clamp(min=0).long().unsqueeze(1)).squeeze(1)
    return torch.where(valid, out, torch.zeros_like(out))


# ---------------------------------------------------------------------------------------------------------
# O(T) preparation shared by every backend
# ---------------------------------------------------------------------------------------------------------


@dataclass
class Prepared:
    """Per-token quantities that do not depend on the current policy (no gradient flows through them)."""

    valid: Tensor  # [T] bool: counts in the loss and the metrics
    seq_idx: Tensor  # [T] int64 in [0, B]
    num_seqs: int  # B
    weights: Tensor  # [T] aggregation weight: loss = sum_t weights[t] * loss_t
    tis: Optional[Tensor]  # [T] truncated mismatch weight (detached) or None


def segment_sum(x: Tensor, seq_idx: Tensor, num_seqs: int) -> Tensor:
    """Per-sequence sums [B] of x (already zero where it must not count)."""
    return x.new_zeros(num_seqs + 1).index_add_(0, seq_idx, x)[:num_seqs]


def to_tokens(per_seq: Tensor, seq_idx: Tensor) -> Tensor:
    return torch.cat([per_seq, per_seq.new_zeros(1)])[seq_idx]


def aggregation_weights(
    valid: Tensor,
    seq_idx: Tensor,
    num_seqs: int,
    loss_agg: str,
    *,
    norm_constant: Optional[float] = None,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """w[T] with loss = sum_t w[t] * loss_t.

    token-mean:              sum_t m_t l_t / N                     (N = #loss tokens, or global_num_tokens)
    seq-mean-token-mean:     (1/S) sum_i (1/n_i) sum_{t in i} l_t  (S = #sequences with >= 1 loss token,
    seq-mean-token-sum:      (1/S) sum_i sum_{t in i} l_t           or global_num_seqs)
    seq-mean-token-sum-norm: (1/(S*L)) sum_i sum_{t in i} l_t      (L = norm_constant or max_i n_i)
    """
    m = valid.to(dtype)
    if loss_agg == "token-mean":
        denom = m.sum().clamp(min=1) if global_num_tokens is None else torch.as_tensor(float(global_num_tokens))
        return m / denom
    n_i = segment_sum(m, seq_idx, num_seqs)
    if global_num_seqs is None:
        s = (n_i > 0).sum().to(dtype).clamp(min=1)
    else:
        s = torch.as_tensor(float(global_num_seqs), dtype=dtype, device=m.device)
    if loss_agg == "seq-mean-token-mean":
        return m / (to_tokens(n_i, seq_idx).clamp(min=1) * s)
    if loss_agg == "seq-mean-token-sum":
        return m / s
    if loss_agg == "seq-mean-token-sum-norm":
        if norm_constant is None:
            big_l = n_i.max().clamp(min=1) if num_seqs > 0 else torch.ones((), dtype=dtype, device=m.device)
        else:
            big_l = torch.as_tensor(float(norm_constant), dtype=dtype, device=m.device)
        return m / (s * big_l)
    raise ValueError(f"unknown loss_agg {loss_agg!r}")


def mismatch_weights(
    old_logprobs: Tensor, gen_logprobs: Tensor, valid: Tensor, seq_idx: Tensor, num_seqs: int, level: str, cap: float
) -> Tensor:
    """Truncated importance weight min(pi_old / pi_gen, cap), per token or per sequence (product)."""
    d = torch.where(valid, old_logprobs - gen_logprobs, torch.zeros_like(old_logprobs))
    if level == "sequence":
        d = to_tokens(segment_sum(d, seq_idx, num_seqs), seq_idx)
    return torch.exp(torch.clamp(d, max=math.log(cap))).detach()


def prepare(
    target_ids: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    config: GRPOLossConfig,
    *,
    old_logprobs: Optional[Tensor],
    gen_logprobs: Optional[Tensor],
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
    dtype: torch.dtype = torch.float32,
) -> Prepared:
    t = target_ids.shape[0]
    if loss_mask.shape[0] != t:
        raise ValueError(f"loss_mask has {loss_mask.shape[0]} tokens, target_ids {t}")
    num_seqs = cu_seqlens.numel() - 1
    sid = seq_index(cu_seqlens, t)
    valid = (loss_mask != 0) & (sid < num_seqs) & (target_ids >= 0)
    w = aggregation_weights(
        valid, sid, num_seqs, config.loss_agg, norm_constant=config.norm_constant,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, dtype=dtype,
    )
    tis = None
    if config.tis_level is not None:
        if gen_logprobs is None or old_logprobs is None:
            raise ValueError("tis_level needs gen_logprobs and old_logprobs")
        tis = mismatch_weights(
            old_logprobs.to(dtype), gen_logprobs.to(dtype), valid, sid, num_seqs, config.tis_level, config.tis_cap
        )
    return Prepared(valid=valid, seq_idx=sid, num_seqs=num_seqs, weights=w, tis=tis)


def seq_mean_log_ratio(logp: Tensor, old_logprobs: Tensor, prep: Prepared) -> Tensor:
    """GSPO's per-sequence mean log ratio, broadcast to tokens [T] (detached)."""
    d = torch.where(prep.valid, logp.detach() - old_logprobs, torch.zeros_like(old_logprobs))
    n = segment_sum(prep.valid.to(d.dtype), prep.seq_idx, prep.num_seqs).clamp(min=1)
    return to_tokens(segment_sum(d, prep.seq_idx, prep.num_seqs) / n, prep.seq_idx)


# ---------------------------------------------------------------------------------------------------------
# Per-token loss (autograd does the gradient here; the kernels derive it by hand)
# ---------------------------------------------------------------------------------------------------------


def kl_penalty(logp: Tensor, ref_logprobs: Tensor, kl_type: str, log_ratio_clamp: float, kl_clamp: float) -> Tensor:
    d = torch.clamp(ref_logprobs - logp, -log_ratio_clamp, log_ratio_clamp)  # log(pi_ref / pi)
    if kl_type == "k1":
        return -d
    if kl_type == "k2":
        return 0.5 * d * d
    if kl_type == "k3":
        return torch.clamp(torch.exp(d) - d - 1, max=kl_clamp)
    raise ValueError(f"unknown kl_type {kl_type!r}")


def per_token_terms(
    logp: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    config: GRPOLossConfig,
    *,
    ref_logprobs: Optional[Tensor] = None,
    tis: Optional[Tensor] = None,
    seq_log_ratio: Optional[Tensor] = None,
) -> dict[str, Tensor]:
    """Unweighted per-token loss and its diagnostics. Garbage in masked positions is the caller's to drop."""
    a = advantages.to(logp.dtype)
    c = config.log_ratio_clamp
    if config.importance_level == "sequence":
        # GSPO-token: value s_i, gradient s_i * d logp_t.
        log_ratio = logp - logp.detach() + seq_log_ratio
    else:
        log_ratio = logp - old_logprobs
    ratio = torch.exp(torch.clamp(log_ratio, -c, c))
    pg1 = -a * ratio
    pg2 = -a * torch.clamp(ratio, 1 - config.eps_low, 1 + config.eps_high)
    pg = torch.maximum(pg1, pg2)
    clipped = pg2 > pg1
    dual = torch.zeros_like(clipped)
    if config.dual_clip_c is not None:
        pg3 = -a * config.dual_clip_c
        dual = (a < 0) & (pg3 < pg)
        pg = torch.where(a < 0, torch.minimum(pg, pg3), pg)
    if tis is not None:
        pg = pg * tis
    loss = pg
    kl = None
    if config.kl_type is not None:
        if ref_logprobs is None:
            raise ValueError("kl_type set but ref_logprobs is None")
        kl = kl_penalty(logp, ref_logprobs, config.kl_type, c, config.kl_clamp)
        loss = loss + config.beta * kl
    return {
        "loss": loss,
        "ratio": ratio.detach(),
        "kl": None if kl is None else kl.detach(),
        "clip_low": clipped & (a < 0),
        "clip_high": clipped & (a > 0),
        "dual": dual,
    }


def summarize(
    valid: Tensor,
    ratio: Tensor,
    clip_low: Tensor,
    clip_high: Tensor,
    dual: Tensor,
    kl: Optional[Tensor],
    config: GRPOLossConfig,
    *,
    old_logprobs: Tensor,
    gen_logprobs: Optional[Tensor],
    tis: Optional[Tensor],
) -> dict[str, Tensor]:
    """Token-mean diagnostics over the loss tokens (0-dim fp32 tensors; .item() them when logging)."""
    f = valid.to(torch.float32)
    n = f.sum()
    nn = n.clamp(min=1)

    def mean(x: Tensor) -> Tensor:
        return (torch.where(valid, x.detach().float(), torch.zeros_like(f)) * f).sum() / nn

    ratio = ratio.detach().float()
    any_valid = n > 0
    one = torch.ones_like(n)
    if ratio.numel() == 0:  # empty micro-batch: amin/amax of nothing would raise
        rmin = rmax = one
    else:
        rmin = torch.where(any_valid, torch.where(valid, ratio, math.inf).amin(), one)
        rmax = torch.where(any_valid, torch.where(valid, ratio, -math.inf).amax(), one)
    out = {
        "num_tokens": n,
        "clip_frac_low": mean(clip_low),
        "clip_frac_high": mean(clip_high),
        "ratio_mean": mean(ratio),
        "ratio_min": rmin,
        "ratio_max": rmax,
    }
    if config.dual_clip_c is not None:
        out["clip_frac_dual"] = mean(dual)
    if kl is not None:
        out["kl_mean"] = mean(kl)
    if gen_logprobs is not None:
        # NeMo RL's token_mult_prob_error: exp|log pi_gen - log pi_train| over loss tokens (1.0 = identical).
        diff = torch.where(valid, (gen_logprobs.float() - old_logprobs.detach().float()).abs(), torch.zeros_like(f))
        out["token_mult_prob_error"] = mean(torch.exp(diff))
    if tis is not None:
        out["tis_weight_mean"] = mean(tis)
    return {k: v.detach().float() for k, v in out.items()}


def grpo_loss_from_logprobs(
    logp: Tensor,
    old_logprobs: Optional[Tensor],
    advantages: Tensor,
    loss_mask: Tensor,
    cu_seqlens: Tensor,
    config: GRPOLossConfig,
    *,
    target_ids: Optional[Tensor] = None,
    ref_logprobs: Optional[Tensor] = None,
    gen_logprobs: Optional[Tensor] = None,
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss from per-token logprobs [T] (differentiable w.r.t. logp). old_logprobs=None: on-policy."""
    if target_ids is None:
        target_ids = torch.zeros_like(loss_mask, dtype=torch.long)
    old = logp.detach() if old_logprobs is None else old_logprobs.to(logp.dtype)
    prep = prepare(
        target_ids, loss_mask, cu_seqlens, config, old_logprobs=old, gen_logprobs=gen_logprobs,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs, dtype=logp.dtype,
    )
    valid = prep.valid
    zero = torch.zeros_like(logp)
    # Sanitise masked positions so nothing (inf/nan in unused inputs) leaks into sums or gradients.
    old = torch.where(valid, old, logp.detach())
    adv = torch.where(valid, advantages.to(logp.dtype), zero)
    ref = None if ref_logprobs is None else torch.where(valid, ref_logprobs.to(logp.dtype), logp.detach())
    seq_lr = seq_mean_log_ratio(logp, old, prep) if config.importance_level == "sequence" else None
    terms = per_token_terms(logp, old, adv, config, ref_logprobs=ref, tis=prep.tis, seq_log_ratio=seq_lr)
    loss = (torch.where(valid, terms["loss"], zero) * prep.weights).sum()
    metrics = summarize(
        valid, terms["ratio"], terms["clip_low"], terms["clip_high"], terms["dual"], terms["kl"], config,
        old_logprobs=old, gen_logprobs=gen_logprobs, tis=prep.tis,
    )
    return loss, metrics


def grpo_loss_reference(
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
    global_num_tokens: Optional[float] = None,
    global_num_seqs: Optional[float] = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Naive reference: materialises log_softmax over [T, V]. With `weight`, `logits` are hidden states."""
    if weight is not None:
        logits = logits @ weight.t()
    logp = token_logprobs_ref(logits, target_ids, config.temperature)
    return grpo_loss_from_logprobs(
        logp, old_logprobs, advantages, loss_mask, cu_seqlens, config, target_ids=target_ids,
        ref_logprobs=ref_logprobs, gen_logprobs=gen_logprobs,
        global_num_tokens=global_num_tokens, global_num_seqs=global_num_seqs,
    )
