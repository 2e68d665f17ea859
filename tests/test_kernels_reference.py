"""The torch reference (sglgym/kernels/reference.py) against small cases computed by hand."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch

from sglgym.kernels.config import TRL_LOSS_TYPE_TO_AGG, GRPOLossConfig
from sglgym.kernels.reference import (
    broadcast_to_tokens,
    group_advantages_ref,
    grpo_loss_from_logprobs,
    token_logprobs_ref,
)

D = torch.float64


def close(a, b, tol=1e-6):
    torch.testing.assert_close(torch.as_tensor(a, dtype=D), torch.as_tensor(b, dtype=D), atol=tol, rtol=tol)


# ------------------------------------------------------------------------------------------ advantages


def test_group_advantages_mean_std_by_hand():
    r = torch.tensor([1.0, 0.0, 2.0, 2.0, 1.0, 2.0, 3.0, 7.0])
    g = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])
    adv = group_advantages_ref(r.double(), g, eps=0.0)
    s = 0.5 / math.sqrt(0.5)  # group 0: mean 0.5, unbiased std sqrt(0.5)
    close(adv, [s, -s, 0, 0, -1, 0, 1, 0])  # group 1 all equal -> 0; group 3 singleton -> 0


def test_group_advantages_loo_and_no_std():
    r = torch.tensor([1.0, 0.0, 1.0, 2.0, 3.0])
    g = torch.tensor([0, 0, 2, 2, 2])
    close(group_advantages_ref(r.double(), g, baseline="loo", std_normalize=False), [1, -1, -1.5, 0, 1.5])
    close(group_advantages_ref(r.double(), g, baseline="mean", std_normalize=False), [0.5, -0.5, -1, 0, 1])
    # LOO then / (std + eps): group 2 has std 1
    close(group_advantages_ref(r.double(), g, baseline="loo", eps=0.5), [1 / (math.sqrt(0.5) + 0.5), -1 / (math.sqrt(0.5) + 0.5), -1, 0, 1])


def test_group_advantages_interleaved_ids_and_tokens():
    r = torch.tensor([1.0, 5.0, 0.0, 5.0])
    g = torch.tensor([7, 3, 7, 3])  # arbitrary, interleaved ids
    adv = group_advantages_ref(r.double(), g, eps=0.0, std_normalize=False)
    close(adv, [0.5, 0, -0.5, 0])
    cu = torch.tensor([0, 2, 2, 5, 6])  # sequence 1 empty; token 6 is padding
    close(broadcast_to_tokens(adv, cu, 7), [0.5, 0.5, -0.5, -0.5, -0.5, 0, 0])


# ------------------------------------------------------------------------------------------ logprobs


def test_token_logprobs_by_hand():
    logits = torch.tensor([[0.0, 0.0], [math.log(3), 0.0], [math.log(9), 0.0], [1.0, 2.0]], dtype=D)
    out = token_logprobs_ref(logits, torch.tensor([0, 0, 0, -100]))
    close(out, [-math.log(2), math.log(0.75), math.log(0.9), 0.0])
    out_t = token_logprobs_ref(logits[2:3], torch.tensor([0]), temperature=2.0)  # ln9/2 = ln3
    close(out_t, [math.log(0.75)])


# ------------------------------------------------------------------------------------------ loss


def _loss(logp, old, adv, mask, cu, cfg, **kw):
    logp = torch.tensor(logp, dtype=D, requires_grad=True)
    old = None if old is None else torch.tensor(old, dtype=D)
    loss, metrics = grpo_loss_from_logprobs(
        logp, old, torch.tensor(adv, dtype=D), torch.tensor(mask), torch.tensor(cu), cfg, **kw
    )
    loss.backward()
    return loss.item(), logp.grad, metrics


def test_ppo_clip_by_hand():
    # ratios 1.5 (A=+1: clipped high), 0.5 (A=-1: clipped low), 1.1 (A=+2: unclipped)
    lp = [-1.0, -1.0, -1.0]
    old = [-1.0 - math.log(1.5), -1.0 - math.log(0.5), -1.0 - math.log(1.1)]
    loss, grad, m = _loss(lp, old, [1.0, -1.0, 2.0], [1, 1, 1], [0, 3], GRPOLossConfig())
    close(loss, (-1.2 + 0.8 - 2.2) / 3)
    close(grad, [0.0, 0.0, -2.2 / 3])  # d(-A r)/dlogp = -A r
    close(m["clip_frac_low"], 1 / 3)
    close(m["clip_frac_high"], 1 / 3)
    close(m["ratio_mean"], (1.5 + 0.5 + 1.1) / 3, 1e-6)
    close(m["ratio_min"], 0.5)
    close(m["ratio_max"], 1.5)


def test_asymmetric_and_dual_clip_by_hand():
    lp = [0.0, 0.0, 0.0]
    old = [-math.log(1.25), -math.log(4.0), -math.log(1.25)]
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28)
    # t0: A=+1, ratio 1.25 < 1.28 -> unclipped: -1.25, grad -1.25
    # t1: A=-1, ratio 4 -> pg1 = 4 > pg2 = 1.28 -> 4, grad -A r = 4
    # t2: A=-1, ratio 1.25 -> 1.25, grad 1.25
    loss, grad, _ = _loss(lp, old, [1.0, -1.0, -1.0], [1, 1, 1], [0, 3], cfg)
    close(loss, (-1.25 + 4 + 1.25) / 3)
    close(grad, [-1.25 / 3, 4 / 3, 1.25 / 3])
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, dual_clip_c=3.0)  # t1 capped at -A c = 3, grad 0
    loss, grad, m = _loss(lp, old, [1.0, -1.0, -1.0], [1, 1, 1], [0, 3], cfg)
    close(loss, (-1.25 + 3 + 1.25) / 3)
    close(grad, [-1.25 / 3, 0.0, 1.25 / 3])
    close(m["clip_frac_dual"], 1 / 3)


@pytest.mark.parametrize(
    "kl_type, value, dvalue",
    [
        ("k1", -math.log(2), 1.0),  # logp - ref
        ("k2", 0.5 * math.log(2) ** 2, -math.log(2)),  # 0.5 (logp - ref)^2, d = logp - ref
        ("k3", 2 - math.log(2) - 1, -1.0),  # e^d - d - 1 with d = ref - logp = ln2; d/dlogp = 1 - e^d
    ],
)
def test_kl_by_hand(kl_type, value, dvalue):
    cfg = GRPOLossConfig(kl_type=kl_type, beta=0.5)
    lp = [math.log(0.5)]
    loss, grad, m = _loss(lp, lp, [0.0], [1], [0, 1], cfg, ref_logprobs=torch.tensor([0.0], dtype=D))
    close(loss, 0.5 * value)
    close(grad, [0.5 * dvalue])
    close(m["kl_mean"], value)


def test_kl_clamps():
    lp = [-12.0, 0.0]
    ref = torch.tensor([0.0, -30.0], dtype=D)
    # k3: e^12 - 13 and e^-20 + 19 (d clamped to -20) both exceed 10 -> 10, no gradient
    loss, grad, _ = _loss(lp, lp, [0.0, 0.0], [1, 1], [0, 2], GRPOLossConfig(kl_type="k3", beta=1.0), ref_logprobs=ref)
    close(loss, 10.0)
    close(grad, [0.0, 0.0])
    # k2: d = 12 inside the clamp; d = -30 -> -20 (no gradient)
    loss, grad, _ = _loss(lp, lp, [0.0, 0.0], [1, 1], [0, 2], GRPOLossConfig(kl_type="k2", beta=1.0), ref_logprobs=ref)
    close(loss, (0.5 * 144 + 0.5 * 400) / 2)
    close(grad, [-12.0 / 2, 0.0])


def test_aggregations_by_hand():
    # on-policy -> ratio 1 -> loss_t = -A_t. seq0 = [A=1], seq1 = [2, 3, 4], seq2 fully masked,
    # token 6 is past cu_seqlens[-1] (padding) and must not count even with mask 1.
    adv = [1.0, 2.0, 3.0, 4.0, 9.0, 9.0, 9.0]
    mask = [1, 1, 1, 1, 0, 0, 1]
    cu = [0, 1, 4, 6]
    want = {
        "token-mean": -10 / 4,
        "seq-mean-token-mean": -(1 + 3) / 2,
        "seq-mean-token-sum": -10 / 2,
        "seq-mean-token-sum-norm": -10 / (2 * 3),  # L defaults to the longest sequence's loss tokens
    }
    for agg, v in want.items():
        loss, grad, m = _loss([-1.0] * 7, None, adv, mask, cu, GRPOLossConfig(loss_agg=agg))
        close(loss, v)
        assert grad[4:].abs().sum() == 0
        close(m["num_tokens"], 4)
    loss, *_ = _loss([-1.0] * 7, None, adv, mask, cu, GRPOLossConfig(loss_agg="seq-mean-token-sum-norm", norm_constant=5))
    close(loss, -10 / 10)
    loss, *_ = _loss([-1.0] * 7, None, adv, mask, cu, GRPOLossConfig(), global_num_tokens=8)
    close(loss, -10 / 8)
    loss, *_ = _loss([-1.0] * 7, None, adv, mask, cu, GRPOLossConfig(loss_agg="seq-mean-token-sum"), global_num_seqs=5)
    close(loss, -10 / 5)


def test_gspo_sequence_ratio_by_hand():
    # seq0: log ratios [0.1, 0.1] -> s = e^0.1 (A=+1, inside clip); seq1: [0.5] -> s = e^0.5 (A=-1: unclipped side)
    lp = [0.0, 0.0, 0.0]
    old = [-0.1, -0.1, -0.5]
    cfg = GRPOLossConfig(importance_level="sequence", loss_agg="seq-mean-token-mean")
    loss, grad, m = _loss(lp, old, [1.0, 1.0, -1.0], [1, 1, 1], [0, 2, 3], cfg)
    s0, s1 = math.exp(0.1), math.exp(0.5)
    close(loss, (-s0 + s1) / 2)
    close(grad, [-s0 / 4, -s0 / 4, s1 / 2])  # GSPO-token gradient: s_i * (-A) * w_t
    close(m["ratio_max"], s1)
    # token-level ratios differ per token; sequence level uses the mean: [0.3, -0.1] -> e^0.1 for both
    loss, grad, _ = _loss([0.0, 0.0], [-0.3, 0.1], [1.0, 1.0], [1, 1], [0, 2], cfg)
    close(loss, -math.exp(0.1))


def test_mismatch_correction_by_hand():
    lp = [0.0, 0.0, 0.0]
    old = [0.0, 0.0, 0.0]
    gen = torch.tensor([-math.log(3), -math.log(1.5), -math.log(1.2)], dtype=D)  # pi_old/pi_gen = 3, 1.5, 1.2
    cfg = GRPOLossConfig(tis_level="token", tis_cap=2.0, loss_agg="seq-mean-token-sum")
    loss, grad, m = _loss(lp, old, [1.0, 1.0, 1.0], [1, 1, 1], [0, 1, 3], cfg, gen_logprobs=gen)
    close(loss, -(2.0 + (1.5 + 1.2)) / 2)  # weight 3 truncated to 2
    close(grad, [-1.0, -0.75, -0.6])
    close(m["tis_weight_mean"], (2 + 1.5 + 1.2) / 3)
    close(m["token_mult_prob_error"], (3 + 1.5 + 1.2) / 3)  # exp|gen - old|
    cfg = GRPOLossConfig(tis_level="sequence", tis_cap=2.0, loss_agg="seq-mean-token-sum")
    loss, grad, _ = _loss(lp, old, [1.0, 1.0, 1.0], [1, 1, 1], [0, 1, 3], cfg, gen_logprobs=gen)
    close(loss, -(2.0 + 2 * 1.8) / 2)  # seq1 weight 1.5 * 1.2 = 1.8 on both tokens


def test_log_ratio_clamp():
    # ratio e^25 is clamped to e^20 and gets no gradient; dual clip caps the loss at -A c
    cfg = GRPOLossConfig(dual_clip_c=3.0)
    loss, grad, _ = _loss([0.0], [-25.0], [-1.0], [1], [0, 1], cfg)
    close(loss, 3.0)
    close(grad, [0.0])
    loss, grad, m = _loss([0.0], [-25.0], [-1.0], [1], [0, 1], GRPOLossConfig())
    close(loss, math.exp(20), 1e-3)
    close(grad, [0.0])


def test_fully_masked_batch_is_zero_and_finite():
    loss, grad, m = _loss([-1.0, -2.0], [float("nan"), float("nan")], [1.0, 1.0], [0, 0], [0, 2], GRPOLossConfig())
    assert loss == 0.0 and grad.abs().sum() == 0
    assert all(torch.isfinite(v) for v in m.values())


def test_trl_mapping():
    assert TRL_LOSS_TYPE_TO_AGG == {
        "grpo": "seq-mean-token-mean", "bnpo": "token-mean", "dapo": "token-mean", "dr_grpo": "seq-mean-token-sum-norm",
    }
    assert GRPOLossConfig.from_trl("dr_grpo", norm_constant=256).loss_agg == "seq-mean-token-sum-norm"
    # TRL's Dr. GRPO L is the max completion length, not the longest sequence of some micro-batch
    assert GRPOLossConfig.from_trl("dr_grpo", max_completion_length=512).norm_constant == 512.0
    with pytest.raises(ValueError, match="max_completion_length"):
        GRPOLossConfig.from_trl("dr_grpo")
    with pytest.raises(ValueError):
        GRPOLossConfig(loss_agg="sum")
