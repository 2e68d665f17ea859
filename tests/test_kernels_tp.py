"""Vocab-parallel (Megatron-style sharded logits / lm_head) with 2 gloo processes on CPU equals the
single-process result: loss, metrics, each rank's logits-gradient shard, and (fused linear) the full
hidden gradient and each rank's weight-gradient shard."""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # inherited by the spawned workers

import tempfile

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from sglgym.kernels import GRPOLossConfig, grpo_loss, token_logprobs
from sglgym.kernels.reference import grpo_loss_reference, token_logprobs_ref

WORLD = 2
T, V, H = 40, 1002, 48  # V_local = 501: odd shard width
CONFIGS = {
    "grpo": GRPOLossConfig(),
    "gspo-k3-tis": GRPOLossConfig(importance_level="sequence", kl_type="k3", beta=0.1, tis_level="token",
                                  tis_cap=1.03, dual_clip_c=1.2, loss_agg="seq-mean-token-mean", temperature=0.8),
    "k2-drgrpo": GRPOLossConfig(kl_type="k2", beta=0.05, loss_agg="seq-mean-token-sum-norm", eps_high=0.28),
}
BACKENDS = ("torch", "triton")


def make_case():
    g = torch.Generator().manual_seed(21)
    cu = torch.tensor([0, 7, 8, 20, 27, 38], dtype=torch.int32)  # + 2 padding tokens
    logits = torch.randn(T, V, generator=g) * 3
    hidden = torch.randn(T, H, generator=g)
    weight = torch.randn(V, H, generator=g) / H**0.5 * 3
    target = torch.randint(0, V, (T,), generator=g)
    target[3] = 1001  # last vocab entry: lives on rank 1
    target[4] = 0  # first: rank 0
    target[10] = -100
    mask = torch.rand(T, generator=g) > 0.2
    mask[20:27] = False
    lp = token_logprobs_ref(logits.double(), target).float()
    lph = token_logprobs_ref(hidden.double() @ weight.double().t(), target).float()
    adv = torch.randn(6, generator=g)[torch.searchsorted(cu[1:], torch.arange(T), right=True).clamp(max=5)]
    case = dict(cu=cu, logits=logits, hidden=hidden, weight=weight, target=target, mask=mask, adv=adv)
    for key, base in (("", lp), ("h_", lph)):
        case[key + "old"] = base + 0.2 * torch.randn(T, generator=g)
        case[key + "ref"] = base + 0.3 * torch.randn(T, generator=g)
        case[key + "gen"] = case[key + "old"] + 0.05 * torch.randn(T, generator=g)
    return case


def run_all(case, rank: int, world: int, group) -> dict:
    """Every (config, backend, input kind) on this rank's vocab shard."""
    vl = V // world
    sl = slice(rank * vl, (rank + 1) * vl)
    out = {}
    for name, cfg in CONFIGS.items():
        for backend in BACKENDS:
            x = case["logits"][:, sl].clone().requires_grad_()
            loss, m = grpo_loss(x, case["target"], case["old"], case["adv"], case["mask"], case["cu"], cfg,
                                ref_logprobs=case["ref"], gen_logprobs=case["gen"], tp_group=group, backend=backend)
            loss.backward()
            out[(name, backend, "logits")] = (loss.detach(), {"logits": x.grad}, m)
            h = case["hidden"].clone().requires_grad_()
            w = case["weight"][sl].clone().requires_grad_()
            loss, m = grpo_loss(h, case["target"], case["h_old"], case["adv"], case["mask"], case["cu"], cfg,
                                weight=w, ref_logprobs=case["h_ref"], gen_logprobs=case["h_gen"], tp_group=group,
                                backend=backend, chunk_rows=9)
            loss.backward()
            out[(name, backend, "linear")] = (loss.detach(), {"hidden": h.grad, "weight": w.grad}, m)
    for backend in BACKENDS:
        x = case["logits"][:, sl].clone().requires_grad_()
        lp = token_logprobs(x, case["target"], 0.7, group, backend=backend)
        (lp * torch.linspace(-1, 1, T)).sum().backward()
        out[("logprobs", backend, "logits")] = (lp.detach(), {"logits": x.grad}, {})
    return out


def _worker(rank: int, init_file: str, case_path: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        case = torch.load(case_path)
        torch.save(run_all(case, rank, WORLD, dist.group.WORLD), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_results():
    case = make_case()
    with tempfile.TemporaryDirectory() as d:
        case_path = os.path.join(d, "case.pt")
        torch.save(case, case_path)
        mp.start_processes(_worker, args=(os.path.join(d, "init"), case_path, d), nprocs=WORLD,
                           start_method="spawn", join=True)
        per_rank = [torch.load(os.path.join(d, f"rank{r}.pt")) for r in range(WORLD)]
    return case, per_rank


def close(a, b, what):
    torch.testing.assert_close(a.double(), b.double(), atol=1e-5, rtol=1e-4, msg=lambda m: f"{what}: {m}")


def test_vocab_parallel_equals_single_process(sharded_results):
    case, per_rank = sharded_results
    single = run_all(case, 0, 1, None)
    vl = V // WORLD
    for key, (loss1, grads1, m1) in single.items():
        for r, res in enumerate(per_rank):
            loss, grads, m = res[key]
            close(loss, loss1, f"{key} rank{r} loss")
            for k, v in m1.items():
                close(m[k], v, f"{key} rank{r} metric {k}")
            if "logits" in grads:
                close(grads["logits"], grads1["logits"][:, r * vl:(r + 1) * vl], f"{key} rank{r} dlogits")
            if "hidden" in grads:
                close(grads["hidden"], grads1["hidden"], f"{key} rank{r} dhidden")
                close(grads["weight"], grads1["weight"][r * vl:(r + 1) * vl], f"{key} rank{r} dweight")


def test_single_process_matches_reference(sharded_results):
    """And the unsharded results are the reference's (so TP == single == reference)."""
    case, _ = sharded_results
    single = run_all(case, 0, 1, None)
    for name, cfg in CONFIGS.items():
        x = case["logits"].double().requires_grad_()
        loss, _ = grpo_loss_reference(x, case["target"], case["old"].double(), case["adv"].double(), case["mask"],
                                      case["cu"], cfg, ref_logprobs=case["ref"].double(),
                                      gen_logprobs=case["gen"].double())
        loss.backward()
        for backend in BACKENDS:
            got_loss, got_grads, _ = single[(name, backend, "logits")]
            close(got_loss, loss.detach(), f"{name} {backend} loss")
            close(got_grads["logits"], x.grad, f"{name} {backend} dlogits")
