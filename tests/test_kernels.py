"""Every fast path (Triton under TRITON_INTERPRET=1, chunked torch) against the fp64 torch reference."""

import math
import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before the first Triton kernel is decorated

import pytest
import torch

from sglgym.kernels import GRPOLossConfig, group_advantages, grpo_loss, token_logprobs
from sglgym.kernels.api import resolve_backend
from sglgym.kernels.reference import (
    broadcast_to_tokens,
    group_advantages_ref,
    grpo_loss_reference,
    token_logprobs_ref,
)

ATOL, RTOL = 1e-5, 1e-4  # fp32 vs fp64 reference, loss and gradients
D = torch.float64

LENGTHS = (9, 1, 14, 6, 10, 5)  # a single-token sequence; sequence 3 is fully masked below
PAD = 2  # tokens past cu_seqlens[-1]


def make_case(T=47, V=1001, H=None, seed=0, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    assert sum(LENGTHS) + PAD == T
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int32)
    case = {}
    if H is None:
        logits = (torch.randn(T, V, generator=g) * scale).to(dtype)
        full = logits.double()
    else:
        hidden = (torch.randn(T, H, generator=g)).to(dtype)
        weight = (torch.randn(V, H, generator=g) * scale / math.sqrt(H)).to(dtype)
        case.update(hidden=hidden, weight=weight)
        full = hidden.double() @ weight.double().t()
    target = torch.randint(0, V, (T,), generator=g)
    mask = torch.rand(T, generator=g) > 0.15
    s3 = slice(int(cu[3]), int(cu[4]))
    mask[s3] = False  # fully masked sequence
    mask[int(cu[1])] = True  # the single-token sequence counts
    mask[T - 1] = True  # padding with mask 1 must still not count
    ignore = int(cu[2]) + 3
    target[ignore] = -100  # ignore index inside a sequence
    lp = token_logprobs_ref(full, target).float()
    old = lp + 0.2 * torch.randn(T, generator=g)
    ref = lp + 0.3 * torch.randn(T, generator=g)
    gen = old + 0.05 * torch.randn(T, generator=g)
    k = int(cu[2]) + 1
    old[k] = lp[k] + 25.0  # log ratio -25: hits the +-20 clamp
    ref[k + 1] = lp[k + 1] + 5.0  # k3 = e^5 - 6 > 10: hits the KL clamp
    old[s3] = float("nan")  # garbage where masked must not leak
    rewards = torch.tensor([1.0, 0.0, 2.0, 2.0, 0.3, 0.9])  # group 1 has zero std
    groups = torch.tensor([0, 0, 1, 1, 2, 2])
    adv = broadcast_to_tokens(group_advantages_ref(rewards, groups), cu, T).float()
    case.update(logits=logits if H is None else None, target=target, mask=mask, cu=cu, old=old, ref=ref, gen=gen, adv=adv)
    return case


CONFIGS = {
    "grpo": GRPOLossConfig(),
    "dapo-seqmean-temp": GRPOLossConfig(eps_high=0.28, loss_agg="seq-mean-token-mean", temperature=0.7),
    "dual-k1-seqsum": GRPOLossConfig(dual_clip_c=1.25, kl_type="k1", beta=0.05, loss_agg="seq-mean-token-sum"),
    "k2-tis-token-drgrpo": GRPOLossConfig(kl_type="k2", beta=0.1, tis_level="token", tis_cap=1.02,
                                          loss_agg="seq-mean-token-sum-norm"),
    "k3-tis-seq-norm": GRPOLossConfig(kl_type="k3", beta=0.1, tis_level="sequence", tis_cap=1.05,
                                      loss_agg="seq-mean-token-sum-norm", norm_constant=64),
    "gspo-k3-dual": GRPOLossConfig(importance_level="sequence", eps_low=3e-4, eps_high=4e-4, kl_type="k3",
                                   beta=0.02, dual_clip_c=1.1, loss_agg="seq-mean-token-mean"),
    "gspo-tis-temp": GRPOLossConfig(importance_level="sequence", tis_level="token", temperature=1.3),
    "kl-only-beta0": GRPOLossConfig(kl_type="k3", beta=0.0),
}
ON_POLICY = {"grpo", "gspo-k3-dual", "kl-only-beta0"}  # also run these with old_logprobs=None


def run_reference(case, cfg, old):
    if case["logits"] is not None:
        x = case["logits"].double().requires_grad_()
        loss, m = grpo_loss_reference(
            x, case["target"], old, case["adv"].double(), case["mask"], case["cu"], cfg,
            ref_logprobs=case["ref"].double(), gen_logprobs=case["gen"].double(),
        )
        loss.backward()
        return loss, {"logits": x.grad}, m
    h = case["hidden"].double().requires_grad_()
    w = case["weight"].double().requires_grad_()
    loss, m = grpo_loss_reference(
        h, case["target"], old, case["adv"].double(), case["mask"], case["cu"], cfg, weight=w,
        ref_logprobs=case["ref"].double(), gen_logprobs=case["gen"].double(),
    )
    loss.backward()
    return loss, {"hidden": h.grad, "weight": w.grad}, m


def run_fast(case, cfg, old, **kw):
    if case["logits"] is not None:
        x = case["logits"].clone().requires_grad_()
        loss, m = grpo_loss(
            x, case["target"], old, case["adv"], case["mask"], case["cu"], cfg,
            ref_logprobs=case["ref"], gen_logprobs=case["gen"], **kw,
        )
        loss.backward()
        return loss, {"logits": x.grad}, m
    h = case["hidden"].clone().requires_grad_()
    w = case["weight"].clone().requires_grad_()
    loss, m = grpo_loss(
        h, case["target"], old, case["adv"], case["mask"], case["cu"], cfg, weight=w,
        ref_logprobs=case["ref"], gen_logprobs=case["gen"], **kw,
    )
    loss.backward()
    return loss, {"hidden": h.grad, "weight": w.grad}, m


def assert_matches(got, want, atol=ATOL, rtol=RTOL, grad_atol=None, grad_rtol=None, metric_rtol=1e-4):
    (l1, g1, m1), (l0, g0, m0) = got, want
    torch.testing.assert_close(l1.detach().double(), l0.detach(), atol=atol, rtol=rtol)
    for k in g0:
        torch.testing.assert_close(g1[k].double(), g0[k], atol=grad_atol or atol, rtol=grad_rtol or rtol, msg=k)
    assert set(m1) == set(m0)
    for k in m0:
        torch.testing.assert_close(m1[k].double(), m0[k].double(), atol=1e-5, rtol=metric_rtol, msg=k)


PATHS = [
    pytest.param(dict(backend="torch"), id="torch"),
    pytest.param(dict(backend="torch", chunk_rows=5), id="torch-chunk5"),
    pytest.param(dict(backend="triton"), id="triton-fused"),
    pytest.param(dict(backend="triton", fused=False), id="triton-2stage"),
]


@pytest.fixture(scope="module")
def case():
    return make_case()


@pytest.fixture(scope="module")
def linear_case():
    return make_case(H=64, V=999, seed=1)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("name", list(CONFIGS))
def test_loss_from_logits_matches_reference(case, name, path):
    cfg = CONFIGS[name]
    olds = [("old", case["old"])] + ([("on-policy", None)] if name in ON_POLICY else [])
    for _, old in olds:
        want = run_reference(case, cfg, None if old is None else old.double())
        got = run_fast(case, cfg, old, **path)
        assert_matches(got, want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("name", ["grpo", "k3-tis-seq-norm", "gspo-tis-temp"])
def test_fused_linear_matches_reference(linear_case, name, backend):
    cfg = CONFIGS[name]
    want = run_reference(linear_case, cfg, linear_case["old"].double())
    for rows in (None, 7):  # default chunking and many uneven chunks
        got = run_fast(linear_case, cfg, linear_case["old"], backend=backend, chunk_rows=rows)
        assert_matches(got, want)


def test_fused_linear_chunk_rows_follow_the_budget(linear_case, monkeypatch):
    """Rows per chunk = budget // (V * 4 bytes), clamped to [1, T]; a budget-sized chunking (here 7 rows,
    set through the env override) gives the loss and gradients of one chunk."""
    from sglgym.kernels import fused_linear as fl

    monkeypatch.delenv(fl.CHUNK_BYTES_ENV, raising=False)
    assert fl.default_linear_chunk_rows(2048, 32000) == 262  # the CPU default: 32 MiB
    assert fl.linear_chunk_bytes(torch.device("cuda")) == 256 << 20
    assert fl.default_linear_chunk_rows(2048, 32000, 32 << 20) == 262
    assert fl.default_linear_chunk_rows(2048, 128000, 32 << 20) == 65
    assert fl.default_linear_chunk_rows(2048, 32000, 64 << 20) == 524
    assert fl.default_linear_chunk_rows(100, 1000, 1 << 30) == 100  # clamped to T
    assert fl.default_linear_chunk_rows(100, 1000, 1) == 1  # at least one row
    monkeypatch.setenv(fl.CHUNK_BYTES_ENV, str(7 * 999 * 4 + 5))
    assert fl.linear_chunk_bytes(torch.device("cpu")) == fl.linear_chunk_bytes(torch.device("cuda")) == 7 * 999 * 4 + 5
    assert fl.default_linear_chunk_rows(47, 999) == 7

    cfg = CONFIGS["k3-tis-seq-norm"]
    chunked = run_fast(linear_case, cfg, linear_case["old"], backend="torch")  # 7 chunks, ragged tail of 5
    monkeypatch.delenv(fl.CHUNK_BYTES_ENV)
    one = run_fast(linear_case, cfg, linear_case["old"], backend="torch", chunk_rows=47)
    assert_matches(chunked, (one[0].detach().double(), {k: g.double() for k, g in one[1].items()}, one[2]),
                   atol=1e-6, rtol=1e-5)


def test_online_softmax_across_many_blocks(case, monkeypatch):
    """Small blocks: the online max/sum-exp carries across 8 blocks with a ragged tail (1001 = 7*128 + 105)."""
    import sglgym.kernels.fused_loss as tk

    monkeypatch.setattr(tk, "block_v", lambda v: 128)
    for name in ("grpo", "gspo-k3-dual"):
        cfg = CONFIGS[name]
        want = run_reference(case, cfg, case["old"].double())
        for fused in (True, False):
            assert_matches(run_fast(case, cfg, case["old"], backend="triton", fused=fused), want)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_extreme_logits(backend):
    """Logits of +-1e4: everything finite. On-policy the loss is exact; off-policy the fp32 logprob of a
    -2e4 token carries ~1e-3 absolute rounding (its ulp), which the ratio inherits, hence rtol 2e-3 there."""
    c = make_case(seed=3)
    g = torch.Generator().manual_seed(5)
    c["logits"] = torch.where(torch.rand(c["logits"].shape, generator=g) < 0.5, -1e4, 1e4) * torch.rand(
        c["logits"].shape, generator=g)
    argmax = c["logits"].argmax(1)
    c["target"] = torch.where(torch.arange(47) % 2 == 0, argmax, c["target"].clamp(min=0))
    lp = token_logprobs_ref(c["logits"].double(), c["target"]).float()
    c["old"], c["ref"], c["gen"] = lp + 0.1, lp - 0.1, lp + 0.05
    for name in ("grpo", "gspo-k3-dual", "dual-k1-seqsum"):
        cfg = CONFIGS[name]
        for fused in (True, False):
            kw = dict(backend=backend, fused=fused)
            want = run_reference(c, cfg, None)
            got = run_fast(c, cfg, None, **kw)
            assert all(torch.isfinite(v).all() for v in got[1].values())
            assert_matches(got, want)
            want = run_reference(c, cfg, c["old"].double())
            got = run_fast(c, cfg, c["old"], **kw)
            assert torch.isfinite(got[0]) and all(torch.isfinite(v).all() for v in got[1].values())
            assert_matches(got, want, atol=1e-4, rtol=2e-3, grad_atol=1e-5, grad_rtol=2e-3, metric_rtol=2e-3)


@pytest.mark.parametrize("path", PATHS)
def test_bf16_logits(path):
    """bf16 logits are upcast exactly in the kernels, so the loss matches the fp64 reference on the same
    bf16 values closely; the gradient is rounded to bf16 on store."""
    c = make_case(seed=4, dtype=torch.bfloat16)
    for name in ("grpo", "gspo-k3-dual"):
        cfg = CONFIGS[name]
        want = run_reference(c, cfg, c["old"].double())
        got = run_fast(c, cfg, c["old"], **path)
        assert got[1]["logits"].dtype == torch.bfloat16
        gmax = want[1]["logits"].abs().max().item()
        assert_matches(got, want, atol=1e-5, rtol=1e-4, grad_atol=gmax / 128, grad_rtol=1 / 128)


@pytest.mark.parametrize("path", PATHS)
def test_inplace_backward_writes_into_logits(case, path):
    cfg = CONFIGS["dual-k1-seqsum"]
    want = run_reference(case, cfg, case["old"].double())
    leaf = case["logits"].clone().requires_grad_()
    logits = leaf * 1.0  # non-leaf buffer, as lm_head output would be
    loss, _ = grpo_loss(logits, case["target"], case["old"], case["adv"], case["mask"], case["cu"], cfg,
                        ref_logprobs=case["ref"], gen_logprobs=case["gen"], inplace_backward=True, **path)
    loss.backward()
    torch.testing.assert_close(leaf.grad.double(), want[1]["logits"], atol=ATOL, rtol=RTOL)
    torch.testing.assert_close(logits.detach(), leaf.grad)  # the logits buffer now holds the gradient


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_fully_masked_batch(case, backend):
    mask = torch.zeros_like(case["mask"])
    for fused in (True, False):
        x = case["logits"].clone().requires_grad_()
        loss, m = grpo_loss(x, case["target"], case["old"], case["adv"], mask, case["cu"], CONFIGS["grpo"],
                            backend=backend, fused=fused)
        loss.backward()
        assert loss.item() == 0.0 and x.grad.abs().sum() == 0
        assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_batch(backend):
    cfg = CONFIGS["gspo-k3-dual"]
    e = torch.empty(0)
    for fused in (True, False):
        x = torch.empty(0, 11, requires_grad=True)
        loss, m = grpo_loss(x, torch.empty(0, dtype=torch.long), e, e, e.bool(), torch.zeros(1, dtype=torch.int32),
                            cfg, ref_logprobs=e, backend=backend, fused=fused)
        loss.backward()
        assert loss.item() == 0.0 and x.grad.shape == (0, 11)
        assert all(torch.isfinite(v) for v in m.values())


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("temperature", [1.0, 0.6])
def test_token_logprobs_matches_reference(case, backend, temperature):
    x = case["logits"].clone().requires_grad_()
    xr = case["logits"].double().requires_grad_()
    target = case["target"]
    dlogp = torch.randn(47, generator=torch.Generator().manual_seed(9))
    lp = token_logprobs(x, target, temperature, backend=backend)
    lr = token_logprobs_ref(xr / 1.0, target, temperature)
    torch.testing.assert_close(lp.double(), lr.detach(), atol=ATOL, rtol=RTOL)
    (lp * dlogp).sum().backward()
    (lr * dlogp.double()).sum().backward()
    torch.testing.assert_close(x.grad.double(), xr.grad, atol=ATOL, rtol=RTOL)


def test_public_names_stay_functions():
    import sglgym.kernels as k
    import sglgym.kernels.fused_loss  # noqa: F401  (importing submodules must not shadow the API)

    assert callable(k.grpo_loss) and callable(k.group_advantages) and callable(k.token_logprobs)


def test_auto_backend_picks_torch_on_cpu(case):
    assert resolve_backend("auto", case["logits"]) == "torch"
    loss_auto, _ = grpo_loss(case["logits"], case["target"], case["old"], case["adv"], case["mask"], case["cu"],
                             CONFIGS["grpo"])
    loss_torch, _ = grpo_loss(case["logits"], case["target"], case["old"], case["adv"], case["mask"], case["cu"],
                              CONFIGS["grpo"], backend="torch")
    assert loss_auto.item() == loss_torch.item()
    with pytest.raises(ValueError):
        resolve_backend("cuda", case["logits"])


# ------------------------------------------------------------------------------------------ advantages


@pytest.mark.parametrize("baseline", ["mean", "loo"])
@pytest.mark.parametrize("std_normalize", [True, False])
def test_group_advantages_triton_matches_reference(baseline, std_normalize):
    g = torch.Generator().manual_seed(11)
    groups = torch.tensor([4, 9, 4, 4, 9, 2, 7, 7, 7, 7, 9, 4, 12, 12])  # interleaved, a singleton (2)
    rewards = torch.randint(0, 3, (14,), generator=g).float()
    rewards[[6, 7, 8, 9]] = 1.0  # group 7: zero std
    rewards[[12, 13]] = torch.tensor([0.25, 0.75])
    lengths = torch.randint(0, 9, (14,), generator=g)
    lengths[3] = 0  # an empty sequence
    cu = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)])
    want = group_advantages_ref(rewards.double(), groups, baseline=baseline, std_normalize=std_normalize)
    kw = dict(baseline=baseline, std_normalize=std_normalize)
    for backend in ("triton", "torch"):
        got = group_advantages(rewards, groups, backend=backend, **kw)
        torch.testing.assert_close(got.double(), want, atol=ATOL, rtol=RTOL)
        t = int(cu[-1]) + 3  # trailing padding gets 0
        tok = group_advantages(rewards, groups, cu_seqlens=cu, num_tokens=t, backend=backend, **kw)
        torch.testing.assert_close(tok.double(), broadcast_to_tokens(want, cu, t), atol=ATOL, rtol=RTOL)
    assert (want[6:10] == 0).all() and want[5] == 0


def test_group_advantages_large_group_triton():
    g = torch.Generator().manual_seed(12)
    rewards = torch.randn(300, generator=g)
    groups = torch.randint(0, 3, (300,), generator=g)
    want = group_advantages_ref(rewards.double(), groups)
    torch.testing.assert_close(group_advantages(rewards, groups, backend="triton").double(), want, atol=ATOL, rtol=RTOL)
