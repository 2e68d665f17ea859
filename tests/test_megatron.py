"""megatron-core end to end on CPU: HF -> Megatron weights, the GRPO plug through megatron's real schedule,
DDP and optimizer, Megatron -> HF weights, refit into the live engine.

The CUDA assumptions of megatron-core are patched in this process only (tests/megatron_cpu.py).
"""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("megatron.core")  # local convenience: CI installs megatron-core into the venv

from megatron_cpu import megatron_on_cpu  # noqa: E402

from sglgym.kernels import GRPOLossConfig, grpo_loss  # noqa: E402
from sglgym.rollout.samples import Sample  # noqa: E402
from sglgym.trainer import convert  # noqa: E402
from sglgym.trainer.batches import MicroBatch, make_micro_batches  # noqa: E402
from sglgym.trainer.megatron import make_forward_step, step_totals  # noqa: E402
from sglgym.trainer.refit import EngineControl, probe, refit_from_tensor  # noqa: E402

# (prompt length, generated length, advantage): varied lengths so micro-batches hold unequal token counts.
SHAPES = [(5, 4, 1.0), (3, 9, -0.5), (7, 3, 0.7), (4, 6, -1.2), (6, 2, 0.3), (2, 7, -0.3)]


def _samples() -> tuple[list[Sample], list[float]]:
    g = torch.Generator().manual_seed(0)
    samples = []
    for p, n, a in SHAPES:
        ids = torch.randint(3, 500, (p + n,), generator=g).tolist()
        samples.append(Sample(
            token_ids=ids, loss_mask=[0] * p + [1] * n, gen_logprobs=[0.0] * p + [-2.0] * n,
            turn_spans=[(p, p + n)], reward=a, group_id=0, prompt_index=0, truncated=False, num_turns=1,
            env="test", engine_url="",
        ))
    return samples, [a for _, _, a in SHAPES]


def _with_old(mbs: list[MicroBatch], old: list[torch.Tensor]) -> list[MicroBatch]:
    """Attach per-sample old logprobs (rows after the first token) to each micro-batch."""
    for mb in mbs:
        mb.old_logprobs = torch.cat([old[i] for i in mb.sample_index])
    return mbs


def _hf_logprobs(hf, sequences: list[list[int]]) -> list[torch.Tensor]:
    out = []
    with torch.no_grad():
        for s in sequences:
            logits = hf(torch.tensor([s])).logits[0, :-1].float()
            out.append(torch.log_softmax(logits, -1).gather(1, torch.tensor(s[1:]).unsqueeze(1)).squeeze(1))
    return out


@pytest.fixture(scope="module")
def hf():
    from transformers import AutoModelForCausalLM

    from sglgym.models import build_tiny_model
    return AutoModelForCausalLM.from_pretrained(build_tiny_model(), dtype=torch.float32).eval()


@pytest.fixture(scope="module")
def mcore():
    with megatron_on_cpu():
        yield


def _megatron(hf, lr: float = 0.0, **overrides):
    """(DDP GPTModel with the HF weights, optimizer, config) as megatron's training loop sets them up."""
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
    from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

    model, config = convert.build_gpt_from_hf(hf.config, use_cpu_initialization=True, calculate_per_token_loss=True,
                                              **overrides)
    convert.load_hf_into_gpt(model, hf.state_dict(), hf.config)
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(grad_reduce_in_fp32=True), model)
    config.finalize_model_grads_func = finalize_model_grads
    # clip_grad=0: megatron clips with an assert that grads are torch.cuda.FloatTensor (the norm is still computed).
    opt = get_megatron_optimizer(OptimizerConfig(optimizer="adam", lr=lr, weight_decay=0.01, clip_grad=0.0,
                                                 params_dtype=torch.float32), [ddp])
    return ddp, opt, config


def _run(ddp, mbs, forward_step, forward_only=False, collect_non_loss_data=False):
    from megatron.core.pipeline_parallel import get_forward_backward_func

    return get_forward_backward_func()(
        forward_step_func=forward_step, data_iterator=iter(mbs), model=[ddp], num_microbatches=len(mbs),
        seq_length=max(mb.input_ids.shape[1] for mb in mbs), micro_batch_size=max(mb.num_seqs for mb in mbs),
        forward_only=forward_only, collect_non_loss_data=collect_non_loss_data,
    )


def test_conversion_is_an_inverse_pair(hf):
    sd = hf.state_dict()
    for spec in ("local", "te"):
        back = dict(convert.megatron_to_hf(convert.hf_to_megatron(sd, hf.config, spec), hf.config))
        assert back.keys() == sd.keys()
        assert all(torch.equal(back[k], sd[k]) for k in sd)
    full = convert.hf_to_megatron(sd, hf.config)
    shards = [convert.shard_tp(full, r, 2) for r in range(2)]
    fc1 = "decoder.layers.0.mlp.linear_fc1.weight"
    gate = sd["model.layers.0.mlp.gate_proj.weight"]
    assert torch.equal(shards[1][fc1][: gate.shape[0] // 2], gate[gate.shape[0] // 2:])  # rank 1: its gate half first
    merged = convert.gather_tp(shards)
    assert all(torch.equal(merged[k], full[k]) for k in full)


def test_megatron_logits_equal_hf(hf, mcore):
    ddp, _, _ = _megatron(hf)
    ids, pos = _logit_probe_input(hf)
    with torch.no_grad():
        ours, theirs = ddp(ids, pos, None), hf(ids).logits
    assert ours.shape == theirs.shape
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


def _grad_case(hf, loss_agg: str):
    """A batch with old logprobs off the current policy by up to +-0.4 (so some tokens are clipped)."""
    samples, advs = _samples()
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, loss_agg=loss_agg)
    noise = torch.Generator().manual_seed(2)
    old = [lp + 0.8 * (torch.rand(lp.shape, generator=noise) - 0.5)
           for lp in _hf_logprobs(hf, [s.token_ids for s in samples])]
    return samples, advs, cfg, old


def _plain_loop(hf, loss_agg: str) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """One HF forward over the whole batch, one grpo_loss, backward -> (loss, grads in Megatron layout)."""
    samples, advs, cfg, old = _grad_case(hf, loss_agg)
    ref = copy.deepcopy(hf).train()
    (whole,) = _with_old(make_micro_batches(samples, advs, max_tokens=10**6), old)
    logits = ref(whole.input_ids, attention_mask=whole.attention_mask).logits
    loss, _ = grpo_loss(whole.packed_logits(logits), whole.target_ids, whole.old_logprobs, whole.advantages,
                        whole.loss_mask, whole.cu_seqlens, cfg, gen_logprobs=whole.gen_logprobs)
    loss.backward()
    return loss.detach(), convert.hf_to_megatron({n: p.grad for n, p in ref.named_parameters()}, hf.config)


def _plug_step(hf, loss_agg: str, **overrides):
    """The plug through megatron's schedule, in 3 micro-batches of unequal token counts, one backward
    -> (reported loss, local main_grads by name, reported metric sums)."""
    samples, advs, cfg, old = _grad_case(hf, loss_agg)
    mbs = _with_old(make_micro_batches(samples, advs, max_tokens=30), old)
    assert len(mbs) >= 3 and len({mb.num_loss_tokens for mb in mbs}) > 1
    ddp, _, _ = _megatron(hf, **overrides)
    ddp.zero_grad_buffer()
    out = _run(ddp, mbs, make_forward_step(cfg, step_totals(mbs)))
    reported = {k: sum(o[k] for o in out) for k in out[0]}
    grads = {n.removeprefix("module."): p.main_grad for n, p in ddp.named_parameters()}
    return reported["loss"][0] / reported["loss"][1], grads, reported


def _assert_grads_close(grads: dict, ref_grads: dict) -> None:
    assert grads.keys() == ref_grads.keys()
    scale = max(g.abs().max() for g in ref_grads.values())
    for name, g in ref_grads.items():
        assert torch.allclose(grads[name], g, atol=1e-5 * scale, rtol=1e-4), (name, (grads[name] - g).abs().max())


@pytest.mark.parametrize("loss_agg", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_plug_gradients_equal_a_plain_loop(hf, mcore, loss_agg):
    loss, ref_grads = _plain_loop(hf, loss_agg)
    reported, grads, metrics = _plug_step(hf, loss_agg)
    assert torch.allclose(reported, loss, atol=1e-6), (reported, loss)
    assert metrics["clip_frac_low"][0] + metrics["clip_frac_high"][0] > 0  # clipping took part
    _assert_grads_close(grads, ref_grads)


def test_plug_refuses_megatron_default_reduction(hf, mcore):
    from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig

    model, config = convert.build_gpt_from_hf(hf.config, use_cpu_initialization=True)  # per-token loss off
    ddp = DistributedDataParallel(config, DistributedDataParallelConfig(), model)
    mbs = make_micro_batches(*_samples(), max_tokens=30)
    with pytest.raises(ValueError, match="calculate_per_token_loss"):
        _run(ddp, mbs, make_forward_step(GRPOLossConfig(), step_totals(mbs)))


def _tp_worker(rank: int, port: int, out_path: str) -> None:
    """Rank `rank` of a tp=2 gloo world: vocab-parallel logits and the plug's gradients, gathered."""
    from megatron.core import parallel_state

    from sglgym.models import build_tiny_model

    torch.set_num_threads(1)
    with megatron_on_cpu(tp=2, rank=rank, world_size=2, init_method=f"tcp://127.0.0.1:{port}"):
        from transformers import AutoModelForCausalLM
        hf = AutoModelForCausalLM.from_pretrained(build_tiny_model(), dtype=torch.float32).eval()
        group = parallel_state.get_tensor_model_parallel_group()
        ddp, _, _ = _megatron(hf, tensor_model_parallel_size=2)
        ids, pos = _logit_probe_input(hf)
        with torch.no_grad():
            local = ddp(ids, pos, None)  # [B, L, V/2]: this rank's vocab slice
        parts = [torch.empty_like(local) for _ in range(2)]
        torch.distributed.all_gather(parts, local.contiguous(), group=group)
        reported, grads, _ = _plug_step(hf, "token-mean", tensor_model_parallel_size=2)
        shards = [{} for _ in range(2)]
        for name, g in grads.items():
            gathered = [torch.empty_like(g) for _ in range(2)]
            torch.distributed.all_gather(gathered, g.contiguous(), group=group)
            for r in range(2):
                shards[r][name] = gathered[r]
        if rank == 0:
            torch.save({"logits": torch.cat(parts, dim=-1), "loss": reported,
                        "grads": convert.gather_tp(shards)}, out_path)


def _logit_probe_input(hf) -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(0, hf.config.vocab_size, (3, 17), generator=torch.Generator().manual_seed(1))
    return ids, torch.arange(17).expand(3, 17)


def test_tensor_parallel_plug_and_shards(hf, tmp_path):
    """tp=2 in two gloo processes: sharded HF weights give HF's logits, and the vocab-parallel loss
    gives the plain loop's gradients once the shards are gathered."""
    import torch.multiprocessing as mp

    from megatron_cpu import free_port

    out = tmp_path / "tp.pt"
    mp.spawn(_tp_worker, args=(free_port(), str(out)), nprocs=2, join=True)
    res = torch.load(out)
    ids, _ = _logit_probe_input(hf)
    with torch.no_grad():
        assert torch.allclose(res["logits"], hf(ids).logits, atol=1e-5)
    loss, ref_grads = _plain_loop(hf, "token-mean")
    assert torch.allclose(res["loss"], loss, atol=1e-6)
    _assert_grads_close(res["grads"], ref_grads)


def test_train_then_refit_engine(hf, mcore, engine):
    samples, advs = _samples()
    mbs = make_micro_batches(samples, advs, max_tokens=30)
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28)
    ddp, opt, _ = _megatron(hf, lr=1e-2)
    forward = make_forward_step(cfg, step_totals(mbs))

    # Old logprobs from megatron itself (forward-only schedule, the plug's non-loss path) == HF's.
    with torch.no_grad():
        per_mb = _run(ddp, mbs, forward, forward_only=True, collect_non_loss_data=True)
    hf_old = _hf_logprobs(hf, [s.token_ids for s in samples])
    for mb, lp in zip(mbs, per_mb):
        mb.old_logprobs = lp
        assert torch.allclose(lp, torch.cat([hf_old[i] for i in mb.sample_index]), atol=1e-5)

    before = {n: p.detach().clone() for n, p in ddp.named_parameters()}
    losses = []
    for _ in range(3):
        ddp.zero_grad_buffer()
        opt.zero_grad()
        out = _run(ddp, mbs, forward)
        losses.append(float(sum(o["loss"][0] for o in out) / sum(o["loss"][1] for o in out)))
        ok, grad_norm, _ = opt.step()
        assert ok and grad_norm > 0
    assert losses[-1] < losses[0] - 1e-3, losses
    assert all(not torch.equal(p, before[n]) for n, p in ddp.named_parameters())

    # Megatron -> HF names and layout; an HF model with those weights is what the engine must now match.
    trained = dict(convert.gpt_to_hf(ddp, hf.config))
    assert trained.keys() == hf.state_dict().keys()
    hf_trained = copy.deepcopy(hf)
    hf_trained.load_state_dict(trained, strict=True)
    with torch.no_grad():
        ids = torch.tensor([samples[1].token_ids])
        pos = torch.arange(ids.shape[1]).unsqueeze(0)
        assert torch.allclose(ddp(ids, pos, None), hf_trained(ids).logits, atol=1e-5)

    control = EngineControl(engine.base_url, engine.api_key)
    sequences = [s.token_ids for s in samples]

    def trainer_fn(model):
        return lambda seqs: [lp.tolist() for lp in _hf_logprobs(model, seqs)]

    base_version = control.weight_version()
    start = probe(control, trainer_fn(hf), sequences)
    assert start.ok, start
    engine_before = control.score(sequences)
    try:
        refit_from_tensor(control, trained.items(), version="megatron-step3")
        assert control.weight_version() == "megatron-step3"
        after = probe(control, trainer_fn(hf_trained), sequences, atol=1e-4)
        assert after.ok, after
        moved = max(abs(a - b) for e0, e1 in zip(engine_before, control.score(sequences)) for a, b in zip(e0, e1))
        assert moved > 1e-2, moved
    finally:
        # The engine is shared by the session: give it its original weights back.
        refit_from_tensor(control, hf.state_dict().items(), version=base_version or "base")
        restored = probe(control, trainer_fn(hf), sequences)
        control.close()
    assert restored.ok, restored
