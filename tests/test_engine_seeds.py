"""`sglgym serve --deterministic`: a chat `seed` holds, alone, under concurrent load and across `n`,
against one live server (real SGLang on CPU: sglgym/engine/deterministic.py), with the official openai SDK."""

from __future__ import annotations

import asyncio

import pytest
import torch
from conftest import start_engine, stop_engine

from sglgym.engine import deterministic
from sglgym.engine.launch import parse_own_args

MODEL = "sglgym-tiny"
USER = [{"role": "user", "content": "Tell me a story about a robot."}]
SAMPLED = {"temperature": 1.0, "max_tokens": 24}


@pytest.fixture(scope="module")
def det_engine():
    engine = start_engine("deterministic", ["--deterministic"])
    yield engine
    stop_engine(engine)


@pytest.fixture(scope="module")
def client(det_engine):
    from openai import OpenAI
    with OpenAI(base_url=det_engine.base_url + "/v1", api_key=det_engine.api_key, timeout=300) as c:
        yield c


def ids_and_logprobs(choice) -> tuple[list[int], list[float]]:
    extra = choice.message.model_extra
    return extra["generation_token_ids"], extra["generation_log_probs"]


def sample(client, messages=USER, **kw) -> tuple[list[int], list[float]]:
    resp = client.chat.completions.create(model=MODEL, messages=messages, **{**SAMPLED, **kw})
    return ids_and_logprobs(resp.choices[0])


# ---------------------------------------------------------------- pieces, no server

def test_flag_is_ours_and_the_rest_passes_through():
    own, rest = parse_own_args(["--deterministic", "--port", "1"])
    assert own.deterministic and rest == ["--port", "1"]
    assert not parse_own_args(["--port", "1"])[0].deterministic


def test_cpu_murmur_hash_equals_sglang_triton_kernel():
    """Our torch `sgl_kernel::murmur_hash32_cpu` draws the same noise as SGLang's Triton kernel (run here by
    Triton's interpreter), so a seed means the same on CPU and GPU."""
    import triton
    from sglang.kernels.ops.sampling.murmur_hash import murmur_hash32_kernel

    seed = torch.tensor([0, 11, 42, 2**40 + 7, 2**63 - 1, -5], dtype=torch.int64).to(torch.uint64)
    positions = torch.tensor([0, 5, 17, 100_000, 3, 2**31 + 3], dtype=torch.int64)
    cols = torch.arange(700)
    expected = torch.empty((6, 700), dtype=torch.uint32)
    murmur_hash32_kernel[(6, triton.cdiv(700, 256))](seed, positions, cols, expected, 6, 700, BLOCK_SIZE=256)
    got = deterministic.murmur_hash32_reference(seed, positions, cols)
    assert got.dtype == torch.uint32
    assert torch.equal(got.to(torch.int64), expected.to(torch.int64))


def test_cpu_batch_invariant_matmul():
    """A row's linear output is bitwise the same whatever rows share the call (plain MKL: not so)."""
    g = torch.Generator().manual_seed(0)
    w, b, x = (torch.randn(s, generator=g) for s in [(160, 64), (160,), (130, 64)])
    sizes = [1, 2, 3, 4, 5, 7, 16, 17, 33, 130]

    def last_rows():
        return [torch.nn.functional.linear(torch.cat([x[1:m], x[:1]]), w, b)[-1] for m in sizes]

    with torch.inference_mode():
        plain = last_rows()
        deterministic.enable_cpu_batch_invariant_mode()
        try:
            invariant = last_rows()
            assert torch.allclose(torch.nn.functional.linear(x, w, b), x @ w.T + b, atol=1e-5)
        finally:
            deterministic.disable_cpu_batch_invariant_mode()
        assert torch.equal(torch.mm(x, w.T), x @ w.T)                  # the override is gone again
    assert all(torch.equal(r, invariant[0]) for r in invariant)
    print("plain MKL: distinct results for one row over", len(sizes), "batch sizes:",
          len({tuple(r.tolist()) for r in plain}))


# ---------------------------------------------------------------- live server

def test_server_runs_sglang_deterministic_inference(det_engine, client):
    sample(client, seed=1, max_tokens=1)
    log = det_engine.log_path.read_text()
    assert "Sampling backend is set to pytorch for deterministic inference" in log
    assert "radix cache is not compatible with torch_native" in log


def test_same_seed_same_tokens(client):
    first = sample(client, seed=11)
    second = sample(client, seed=11)
    assert len(first[0]) == 24
    assert first == second                                            # ids and logprobs, bitwise


def test_seed_holds_under_concurrent_load(det_engine, client):
    """The seeded request, fired together with 6 different ones (other prompts, seeds, lengths, n), gives
    bitwise the tokens and logprobs it gives alone: batch invariance, not only seeded noise."""
    from openai import AsyncOpenAI

    alone = sample(client, seed=11)

    async def burst(round_: int):
        async with AsyncOpenAI(base_url=det_engine.base_url + "/v1", api_key=det_engine.api_key,
                               timeout=300) as aclient:
            others = [aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Question {round_}.{i}: " + "why? " * (3 * i + 1)}],
                temperature=1.0, max_tokens=40 + 8 * i, seed=100 * round_ + i, n=1 + i % 2) for i in range(6)]
            target = aclient.chat.completions.create(model=MODEL, messages=USER, seed=11, **SAMPLED)
            results = await asyncio.gather(*others[:3], target, *others[3:])
        return results[3]

    for round_ in range(2):
        resp = asyncio.run(burst(round_))
        assert ids_and_logprobs(resp.choices[0]) == alone, f"round {round_}"


def test_seed_holds_when_long_prompts_share_the_prefill(det_engine, client):
    """Seven ~1000-1500-token prompts at once overflow a 4096-token prefill batch. With SGLang's chunked
    prefill the seeded prompt could be cut at a load-dependent place (its logprobs then changed); on CPU
    `--deterministic` turns chunking off (deterministic.CPU_DEFAULTS), so it is prefilled in one piece."""
    from openai import AsyncOpenAI

    target = [{"role": "user", "content": "Tell me about robots. " + "robots are great. " * 120}]
    alone = sample(client, target, seed=11)

    async def burst(position: int):
        async with AsyncOpenAI(base_url=det_engine.base_url + "/v1", api_key=det_engine.api_key,
                               timeout=600) as aclient:
            others = [aclient.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": f"Other {position}.{i} " + "why not? " * (160 + 10 * i)}],
                seed=i, **SAMPLED) for i in range(6)]
            seeded = aclient.chat.completions.create(model=MODEL, messages=target, seed=11, **SAMPLED)
            results = await asyncio.gather(*others[:position], seeded, *others[position:])
        return results[position]

    for position in (2, 4):
        assert ids_and_logprobs(asyncio.run(burst(position)).choices[0]) == alone, f"position {position}"


def test_n_choices_reproducible_and_distinct(client):
    def choices():
        resp = client.chat.completions.create(model=MODEL, messages=USER, seed=11, n=3, **SAMPLED)
        return [ids_and_logprobs(c) for c in resp.choices]

    first, second = choices(), choices()
    assert first == second
    ids = [tuple(c[0]) for c in first]
    assert len(set(ids)) == 3, ids
    assert first[0] == sample(client, seed=11)                     # choice 0 is the seed itself


def test_different_seeds_give_different_tokens(client):
    runs = {seed: tuple(sample(client, seed=seed)[0]) for seed in (1, 2, 3, 4, 5)}
    assert len(set(runs.values())) == len(runs), runs


def test_unseeded_requests_get_a_fresh_seed_they_can_replay(client):
    """SGLang alone would sample every unseeded request with seed 42 (identical GRPO samples); the route
    draws a fresh seed per request and returns each choice's seed, which replays that choice."""
    resp = client.chat.completions.create(model=MODEL, messages=USER, n=2, **SAMPLED)
    seeds = [c.model_extra["seed"] for c in resp.choices]
    assert seeds[0] != seeds[1]
    assert ids_and_logprobs(resp.choices[0]) != ids_and_logprobs(resp.choices[1])
    assert sample(client) != sample(client)
    assert sample(client, seed=seeds[0]) == ids_and_logprobs(resp.choices[0])
    assert resp.system_fingerprint == "sglgym-deterministic"


def test_choice_seeds_do_not_overlap_the_next_seed(client):
    resp = client.chat.completions.create(model=MODEL, messages=USER, seed=11, n=2, **SAMPLED)
    assert ids_and_logprobs(resp.choices[1]) != sample(client, seed=12)


def test_rollout_seed_reproduces_a_batch(det_engine, tmp_path):
    """`sglgym rollout --seed` against a deterministic engine collects the same samples twice."""
    import json
    import subprocess
    import sys
    runs = []
    for k in range(2):
        out = tmp_path / f"run{k}.jsonl"
        cmd = [sys.executable, "-m", "sglgym.cli", "rollout", "--env", "arithmetic", "--batch-groups", "2", "--no-progress",
               "--group-size", "2", "--max-tokens", "12", "--seed", "7", "--engine-url", det_engine.base_url,
               "--api-key", det_engine.api_key, "--out", str(out)]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        runs.append(sorted((s["prompt_index"], s["meta"]["sample_index"], tuple(s["token_ids"]),
                            tuple(s["gen_logprobs"])) for s in rows))
    assert len(runs[0]) == 4 and runs[0] == runs[1]


def test_greedy_and_logprobs_match_transformers(client, tiny_model_path):
    """Batch-invariant matmuls keep the numerics: greedy ids are transformers' argmax and the logprobs of a
    seeded sample match a transformers forward, as the normal engine's do (tests/test_engine_route.py)."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()
    for kw in ({"temperature": 0.0, "max_tokens": 16}, {"seed": 7}):
        resp = client.chat.completions.create(model=MODEL, messages=USER, **{**SAMPLED, **kw})
        extra = resp.choices[0].message.model_extra
        prompt, gen, lps = extra["prompt_token_ids"], extra["generation_token_ids"], extra["generation_log_probs"]
        with torch.no_grad():
            logits = model(torch.tensor([prompt + gen])).logits[0].double()
        logp = torch.log_softmax(logits, dim=-1)[len(prompt) - 1:len(prompt) + len(gen) - 1]
        if kw.get("temperature") == 0.0:
            assert gen == logp.argmax(-1).tolist()
        ref = logp[torch.arange(len(gen)), torch.tensor(gen)]
        assert torch.allclose(torch.tensor(lps, dtype=torch.float64), ref, atol=1e-4), (torch.tensor(lps) - ref).abs().max()
