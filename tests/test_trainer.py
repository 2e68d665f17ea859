"""Trainer against the live engine: a GRPO step moves the engine through each refit path and the engine
then agrees with the trainer; the loss goes down on a fixed batch; `sglgym train` runs end to end.

Every test that changes the session engine's weights gives the original weights back before it ends.
"""

from __future__ import annotations

import json

import pytest
import torch

from sglgym.kernels import GRPOLossConfig, group_advantages
from sglgym.rollout.samples import Sample
from sglgym.trainer.batches import make_micro_batches
from sglgym.trainer.policy import HFPolicy, OptimConfig
from sglgym.trainer.ranks import Ranks
from sglgym.trainer.refit import EngineControl, probe
from sglgym.trainer.refitter import Refitter

LOSS = GRPOLossConfig(eps_low=0.2, eps_high=0.28)


def _reward(gen_ids: list[int]) -> float:
    # A stand-in environment with a learnable, varied signal: the share of even token ids.
    return sum(1 for t in gen_ids if t % 2 == 0) / max(len(gen_ids), 1)


@pytest.fixture(scope="module")
def samples(engine) -> list[Sample]:
    """4 groups of 4 sampled completions from the engine, exactly as the engine saw and sampled them."""
    out = []
    with engine.client(timeout=120) as client:
        for p in range(4):
            r = client.post("/v1/chat/completions", json={
                "messages": [{"role": "user", "content": f"What is {p} + {p + 3}?"}],
                "n": 4, "temperature": 1.0, "max_tokens": 8, "seed": 100 + p,
            })
            assert r.status_code == 200, r.text
            for c in r.json()["choices"]:
                m = c["message"]
                prompt, gen = m["prompt_token_ids"], m["generation_token_ids"]
                out.append(Sample(
                    token_ids=prompt + gen, loss_mask=[0] * len(prompt) + [1] * len(gen),
                    gen_logprobs=[0.0] * len(prompt) + m["generation_log_probs"],
                    turn_spans=[(len(prompt), len(prompt) + len(gen))], reward=_reward(gen), group_id=p,
                    prompt_index=p, truncated=c["finish_reason"] == "length", num_turns=1, env="stand-in",
                    engine_url=engine.base_url))
    for s in out:
        s.validate()
    return out


def _micro_batches(samples: list[Sample], max_tokens: int = 64):
    rewards = torch.tensor([s.reward for s in samples])
    adv = group_advantages(rewards, torch.tensor([s.group_id for s in samples]), baseline="mean", std_normalize=True)
    assert adv.abs().max() > 0.1, "the stand-in rewards must give some group a signal"
    return make_micro_batches(samples, adv.tolist(), max_tokens)


def _refit(path: str, control: EngineControl, policy: HFPolicy, version: str, tmp_path) -> None:
    refitter = Refitter(path, policy, Ranks(), [control], tmp_path)  # gloo on CPU, NCCL on GPU
    refitter.version = int(version.rsplit("-", 1)[1]) - 1
    try:
        metrics = refitter.refit()
    finally:
        refitter.close()
    assert metrics["refit_s"] > 0 and metrics["refit_gb"] == pytest.approx(
        sum(t.numel() * 4 for _, t in policy.named_tensors()) / 1e9)


@pytest.mark.parametrize("path", ["tensor", "disk", "distributed"])
def test_grpo_step_moves_engine_and_refit_keeps_agreement(path, samples, control, restore_engine, tiny_model_path,
                                                         tmp_path):
    policy = HFPolicy(tiny_model_path, OptimConfig(lr=1e-2))
    sequences = [s.token_ids for s in samples[::4]]
    start = probe(control, lambda seqs: policy.score(seqs), sequences)
    assert start.ok, start  # same weights on both sides before training

    engine_before = control.score(sequences)
    metrics = policy.grpo_step(_micro_batches(samples), LOSS)
    assert metrics["grad_norm"] > 0 and metrics["num_tokens"] == sum(s.num_generated for s in samples)
    # The sampled logprobs are the trainer's own before the step (fp32 CPU: engine == trainer).
    assert 1.0 <= metrics["token_mult_prob_error"] <= 1.0 + 1e-4

    version = "step-7"
    _refit(path, control, policy, version, tmp_path)
    assert control.weight_version() == version

    engine_after = control.score(sequences)
    moved = max(abs(a - b) for e0, e1 in zip(engine_before, engine_after) for a, b in zip(e0, e1))
    assert moved > 1e-3, f"the {path} refit did not change the engine's outputs (max move {moved:.2e})"
    after = probe(control, lambda seqs: policy.score(seqs), sequences, atol=1e-4)
    assert after.ok, after


def test_loss_decreases_on_fixed_batch(samples, tiny_model_path):
    policy = HFPolicy(tiny_model_path, OptimConfig(lr=1e-3))
    mbs = _micro_batches(samples, max_tokens=64)
    assert len(mbs) > 1  # gradients accumulate over several micro-batches
    for mb in mbs:  # PPO-style epochs on one batch: the ratio is taken against these fixed old logprobs
        mb.old_logprobs = policy.logprobs(mb)
    losses = [policy.grpo_step(mbs, LOSS)["loss"] for _ in range(6)]
    assert losses[-1] < losses[0] - 1e-2, losses


def test_kl_to_frozen_reference(samples, tiny_model_path):
    policy = HFPolicy(tiny_model_path, OptimConfig(lr=1e-2))
    policy.freeze_reference()
    cfg = GRPOLossConfig(eps_low=0.2, eps_high=0.28, kl_type="k3", beta=0.1)
    kls = []
    for _ in range(2):
        mbs = _micro_batches(samples)
        for mb in mbs:
            mb.ref_logprobs = policy.ref_logprobs(mb)
        kls.append(policy.grpo_step(mbs, cfg)["kl_mean"])
    assert kls[0] == pytest.approx(0.0, abs=1e-7)  # the policy still is the reference
    assert kls[1] > 1e-5                            # one step later it is not, and the KL says by how much
    ref = dict(policy.reference.named_parameters())
    assert any(not torch.equal(p, ref[n]) for n, p in policy.model.named_parameters())


def test_micro_batch_split_does_not_change_the_step(samples, tiny_model_path):
    """Batch-wide denominators: one big micro-batch and many small ones give the same update."""
    a = HFPolicy(tiny_model_path, OptimConfig(lr=1e-2))
    b = HFPolicy(tiny_model_path, OptimConfig(lr=1e-2))
    ma = a.grpo_step(_micro_batches(samples, max_tokens=10_000), LOSS)
    mb = b.grpo_step(_micro_batches(samples, max_tokens=40), LOSS)
    assert ma["loss"] == pytest.approx(mb["loss"], abs=1e-6)
    # Compare gradients, not the updated weights: Adam's first step is ~lr * sign(grad), which turns
    # float-rounding differences of near-zero gradient entries into lr-sized ones.
    for (n, pa), (_, pb) in zip(a.model.named_parameters(), b.model.named_parameters()):
        assert torch.allclose(pa.grad, pb.grad, rtol=1e-4, atol=1e-7), n
    assert ma["grad_norm"] == pytest.approx(mb["grad_norm"], rel=1e-5)


def test_sglgym_train_two_steps_end_to_end(engine, control, restore_engine, tmp_path):
    from sglgym.trainer.cli import main

    out = tmp_path / "run"
    summary = main([
        "--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(out),
        "--set", "steps=2", "--set", "sft_steps=3", "--set", "sft_batch=8", "--set", "group_size=4",
        "--set", "batch_groups=2", "--set", "dynamic_sampling=false", "--set", "eval_rows=8",
        "--set", "probe_every=1", "--set", "time_budget_s=null", "--set", "lr=1e-3",
    ])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["samples"] == 8 and m["rollout_failures"] == 0
        for key in ("reward_mean", "adv_std", "loss", "clip_frac_low", "clip_frac_high", "token_mult_prob_error",
                    "tokens_per_s", "gen_s", "train_s", "refit_s", "probe_max_abs_diff", "kl_step"):
            assert key in m, key
        assert 0.0 <= m["kl_step"] < 1.0  # k3 is never negative; a small step moves the policy a little
        assert m["probe_ok"] and m["probe_max_abs_diff"] <= 1e-4
        assert m["token_mult_prob_error"] <= 1.05
    assert control.weight_version() == "step-3"  # warm-up refit + 2 GRPO steps
    saved = json.loads((out / "summary.json").read_text())
    assert saved["grpo_steps"] == 2 and 0.0 <= saved["reward_before"] <= 1.0
    assert summary["reward_after"] == saved["reward_after"]
    assert (out / "reward.png").stat().st_size > 1000
    assert (out / "config.yaml").exists()


def test_sglgym_train_mixes_envs_by_weight(engine, control, restore_engine, tmp_path):
    """Three envs in one run (single-turn, tools, multi-turn): groups mixed 5:3:2, per-env metrics every
    step, held-out reward per env."""
    from sglgym.trainer.cli import main

    out = tmp_path / "mixed"
    summary = main([
        "--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(out),
        "--set", "envs={arithmetic: 0.5, calculator: 0.3, guess: 0.2}",
        "--set", "env_set=[calculator.agent.max_turns=2, guess.agent.max_turns=2]",
        "--set", "steps=2", "--set", "sft_steps=2", "--set", "sft_batch=8", "--set", "group_size=2",
        "--set", "batch_groups=10", "--set", "dynamic_sampling=false", "--set", "eval_rows=2",
        "--set", "eval_samples=1", "--set", "probe_every=2", "--set", "time_budget_s=null",
    ])
    envs = ("arithmetic", "calculator", "guess")
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    for m in lines:
        assert m["rollout_failures"] == 0 and m["samples"] == 20
        assert [m[f"samples/{e}"] for e in envs] == [10, 6, 4]         # 5:3:2 groups of 2
        for e in envs:
            assert 0.0 <= m[f"reward_mean/{e}"] <= 1.0 and 0.0 <= m[f"truncation_rate/{e}"] <= 1.0
            assert m[f"rollouts_failed/{e}"] == 0
    assert lines[-1]["probe_ok"]
    assert summary["sft_envs"] == ["arithmetic", "calculator"]        # guess rows have no reference answer
    for key in ("reward_before_per_env", "reward_after_per_env"):
        assert sorted(summary[key]) == sorted(envs) and all(0.0 <= v <= 1.0 for v in summary[key].values())
    assert (out / "reward.png").stat().st_size > 1000


def test_train_config_coerces_types_and_names_bad_keys(tmp_path):
    from sglgym.trainer.config import load_train_config

    path = tmp_path / "train.yaml"
    path.write_text("lr: 1e-3\nsteps: 5\nloss: {eps_high: 3e-1}\n")
    cfg = load_train_config(path, ["group_size=4", "time_budget_s=null", "loss.dual_clip_c=3"])
    assert cfg.lr == 1e-3 and isinstance(cfg.lr, float) and cfg.steps == 5 and cfg.time_budget_s is None
    assert cfg.loss == {"loss_agg": "token-mean", "eps_low": 0.2, "eps_high": 0.3, "dual_clip_c": 3.0}
    assert cfg.loss_config().eps_high == 0.3
    for bad, field in (("lr=fast", "lr"), ("steps=1.5", "steps"), ("group_size=0", "group_size"),
                       ("nope=1", "nope"), ("loss.kl_type=k9", "kl_type"), ("loss.foo=1", "foo"),
                       ("refit=carrier-pigeon", "refit"), ("backend=mpi", "backend"), ("fsdp.shards=2", "fsdp.shards"),
                       ("envs.guess=0", "envs"), ("top_p=2", "top_p")):
        with pytest.raises(ValueError, match=field):
            load_train_config(None, [bad])
    # text fields keep what was written, even when YAML reads it as a number or a date
    cfg = load_train_config(None, ["engine_api_key=123456", "out_dir=2024-01-01", "steps=0"])
    assert cfg.engine_api_key == "123456" and cfg.out_dir == "2024-01-01" and cfg.steps == 0


def test_lr_schedule_is_a_function_of_the_step():
    from sglgym.trainer.config import TrainConfig

    linear = TrainConfig(steps=5, lr=1e-3, lr_schedule="linear", lr_final_ratio=0.2)
    assert [linear.lr_at(s) for s in range(1, 6)] == pytest.approx([1e-3, 8e-4, 6e-4, 4e-4, 2e-4])
    assert linear.lr_at(9) == pytest.approx(2e-4)            # past the end (steps lowered on resume): the floor
    constant = TrainConfig(steps=5, lr_schedule="constant")
    assert {constant.lr_at(s) for s in range(1, 6)} == {1e-3}


def test_train_flags_set_fields_as_given():
    from sglgym.trainer.cli import build_parser, load

    args = build_parser().parse_args(["--api-key", "123456", "--out", "2024-01-01", "--engine-url", "http://a:1",
                                      "--engine-url", "http://b:2"])
    cfg = load(args)
    assert cfg.engine_api_key == "123456" and cfg.out_dir == "2024-01-01"
    assert cfg.engines() == ["http://a:1", "http://b:2"]


def test_distributed_refit_is_one_group_with_every_replica(control, restore_engine, tiny_model_path, tmp_path):
    """`refit: distributed` with two engine replicas: one weight-update group (trainer rank 0, the engines
    at rank offsets 1 and 2), each bucket broadcast once; both engines end on the trainer's weights."""
    from conftest import start_engine, stop_engine

    replica = start_engine("dist-replica")
    other = EngineControl(replica.base_url, replica.api_key)
    policy = HFPolicy(tiny_model_path, OptimConfig(lr=1e-2))
    with torch.no_grad():   # weights the engines do not have yet
        for p in policy.model.parameters():
            p.add_(torch.randn_like(p) * 1e-2)
    refitter = Refitter("distributed", policy, Ranks(), [control, other], tmp_path)
    refitter.version = 8
    try:
        refitter.refit()
        assert torch.distributed.get_world_size(refitter.group.group) == 3
        agreement = refitter.check_agreement([list(range(3, 40))])
        refitter.refit()                      # the group is kept between refits
        assert control.weight_version() == other.weight_version() == "step-10"
    finally:
        refitter.close()
        stop_engine(replica)
    assert agreement["probe_ok"] and agreement["probe_max_abs_diff"] <= 1e-4
