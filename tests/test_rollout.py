"""Rollout package without the engine: samples, token tracking, config, env servers at the protocol level
(scripted tool calls), the agent loop and collector against a scripted fake engine, spin-up cleanup."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI

from rollout.helpers import children_of, faulty_env, scripted_engine, serve_in_thread, tool_call, wait_dead
from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.rollout import (ContiguityError, Env, EnvFleet, Sample, TokenTracker, collect_batch_sync,
                            load_config, read_jsonl, select, write_jsonl)
from sglgym.rollout.config import AgentConfig, EnvConfig
from sglgym.rollout.envs.calculator import CalculatorEnv
from sglgym.rollout.envs.guess import GuessEnv
from sglgym.rollout.responses import to_chat_messages, to_chat_tools
from sglgym.rollout.seeds import rollout_seed, unpack_rollout_seed

REPO = Path(__file__).resolve().parents[1]
CONFIG = DEFAULT_CONFIG


# --- samples and token tracking ------------------------------------------------------------------
def test_tracker_packs_turns_and_sample_roundtrips(tmp_path):
    t = TokenTracker()
    t.add_turn([1, 2, 3], [10, 11, 2], [-0.1, -0.2, -0.3])
    t.add_turn([1, 2, 3, 10, 11, 2, 5, 6], [12], [-0.4])
    s = t.to_sample(reward=1.0, group_id=3, prompt_index=7, truncated=False, env="x", engine_url="u",
                    meta={"k": 1})
    assert s.token_ids == [1, 2, 3, 10, 11, 2, 5, 6, 12]
    assert s.loss_mask == [0, 0, 0, 1, 1, 1, 0, 0, 1]
    assert s.gen_logprobs == [0, 0, 0, -0.1, -0.2, -0.3, 0, 0, -0.4]
    assert s.turn_spans == [(3, 6), (8, 9)] and s.num_turns == 2 and s.prompt_len == 3
    s.validate()
    path = write_jsonl([s, s], tmp_path / "s.jsonl")
    back = read_jsonl(path)
    assert back == [s, s] and isinstance(back[0].turn_spans[0], tuple)


def test_tracker_reports_divergence_readably():
    t = TokenTracker(decode=lambda ids: "|".join(map(str, ids)))
    t.add_turn([1, 2, 3], [10, 11], [-1.0, -1.0])
    with pytest.raises(ContiguityError) as e:
        t.add_turn([1, 2, 3, 10, 99, 5], [4], [-1.0])
    msg = str(e.value)
    assert "turn 1" in msg and "first difference at position 4" in msg
    assert "[11]" not in msg and "11" in msg and "99" in msg and "text" in msg


def test_sample_validate_catches_bad_mask():
    s = Sample([1, 2], [0, 1], [0.0, -1.0], [(1, 2)], 0.0, 0, 0, False, 1, "e", "u")
    s.validate()
    s.loss_mask = [1, 1]
    with pytest.raises(ValueError):
        s.validate()


# --- config ---------------------------------------------------------------------------------------
def test_config_overrides_and_selection():
    cfgs = load_config(CONFIG, ["guess.params.high=50", "guess.agent.max_turns=3", "arithmetic.params.difficulty=4"])
    assert cfgs["guess"].params["high"] == 50 and cfgs["guess"].agent.max_turns == 3
    assert cfgs["guess"].agent.user_turns is True
    assert list(select(cfgs, ["guess,arithmetic"])) == ["guess", "arithmetic"]
    with pytest.raises(KeyError, match="unknown environment"):
        select(cfgs, ["nope"])
    with pytest.raises(ValueError, match="unknown agent keys"):
        load_config(CONFIG, ["guess.agent.max_turn=3"])
    rows = Env(cfgs["guess"], "").dataset(20, seed=1)
    assert all(1 <= r["target"] <= 50 for r in rows)
    assert load_config(None)["calculator"].entrypoint.endswith("CalculatorEnv")


def test_datasets_are_seeded_nemo_gym_rows():
    cfgs = load_config(CONFIG)
    for name in ("arithmetic", "calculator", "guess"):
        env = Env(cfgs[name], "")
        a, b = env.dataset(8, seed=0), env.dataset(8, seed=0)
        assert a == b and a != env.dataset(8, seed=0, split="test") and a != env.dataset(8, seed=1)
        for row in a:
            assert row["agent_ref"]["name"] == name
            assert row["responses_create_params"]["input"][-1]["role"] == "user"
    calc = Env(cfgs["calculator"], "").dataset(1)[0]
    assert [t["name"] for t in calc["responses_create_params"]["tools"]] == ["add", "mul"]
    chat_tools = to_chat_tools(calc["responses_create_params"]["tools"])
    assert chat_tools[0]["function"]["parameters"]["required"] == ["a", "b"]
    msgs = to_chat_messages([{"role": "developer", "content": [{"type": "input_text", "text": "hi"}]},
                             {"type": "function_call", "name": "add", "arguments": "{}", "call_id": "c"},
                             {"type": "function_call_output", "call_id": "c", "output": "3"}])
    assert [m["role"] for m in msgs] == ["system", "assistant", "tool"] and msgs[0]["content"] == "hi"


# --- env servers at the protocol level -------------------------------------------------------------
@pytest.fixture(scope="module")
def fleet():
    with EnvFleet(select(load_config(CONFIG), ["arithmetic", "calculator", "guess"])) as f:
        yield f


def _response(*items):
    return {"output": list(items)}


def _assistant(text):
    return {"type": "message", "role": "assistant", "content": [{"type": "output_text", "text": text}]}


def test_calculator_tools_and_verify_with_scripted_calls(fleet):
    env = fleet["calculator"]
    row = CalculatorEnv(steps=2).dataset(1, seed=5)[0]
    with httpx.Client(base_url=env.url, timeout=10) as c:
        seeded = c.post("/seed_session", json=row)
        assert seeded.status_code == 200 and seeded.cookies.get("sglgym_session")
        # the client's cookie jar now sends the session back on every call, as an agent does
        assert c.post("/add", json={"a": 2, "b": 3.5}).json() == {"result": 5.5}
        assert c.post("/mul", json={"a": 4, "b": 6}).json() == {"result": 24}
        bad = c.post("/mul", json={"a": 4})
        assert bad.status_code == 422 and "missing argument" in bad.json()["error"]
        assert c.post("/mul", json={"a": "x", "b": 1}).status_code == 422
        right = _response({"type": "function_call", "name": "add", "arguments": "{}", "call_id": "c"},
                          _assistant(f"The answer is {row['expected_answer']}."))
        v = c.post("/verify", json={**row, "response": right}).json()
        assert v["reward"] == 1.0 and v["tool_calls_made"] == 4 and v["expected_answer"] == row["expected_answer"]
        wrong = _response(_assistant(f"It is {row['expected_answer'] + 1}"))
        c.cookies.clear()
        assert c.post("/verify", json={**row, "response": wrong}).json()["reward"] == 0.0
        assert c.post("/verify", json=row).status_code == 422   # no response: a clear error


def test_guess_steps_and_arithmetic_verify(fleet):
    row = GuessEnv().dataset(1, seed=3)[0]
    target = row["target"]
    with httpx.Client(base_url=fleet["guess"].url, timeout=10) as c:
        step = lambda text: c.post("/step", json={**row, "response": _response(_assistant(text))}).json()  # noqa
        assert step(f"{target - 1}") == {"observation": "higher", "terminated": False}
        assert step(f"maybe {target + 1}") == {"observation": "lower", "terminated": False}
        assert step("no idea")["observation"].startswith("Reply with a number")
        assert step(str(target)) == {"observation": None, "terminated": True}
        assert c.post("/verify", json={**row, "response": _response(_assistant("1"), _assistant(str(target)))}
                      ).json()["reward"] == 1.0
    arow = Env(fleet["arithmetic"].config, "").dataset(1)[0]
    with httpx.Client(base_url=fleet["arithmetic"].url, timeout=10) as c:
        ok = c.post("/verify", json={**arow, "response": _response(_assistant(f"= {arow['expected_answer']}"))})
        assert ok.json()["reward"] == 1.0


# --- agent loop and collector against a scripted engine --------------------------------------------
def calculator_script(msgs, body):
    """Model that solves `Compute (a op b) op c.` with tool calls, then answers."""
    n_tool = sum(1 for m in msgs if m["role"] == "tool")
    if n_tool == 0:
        return None, [tool_call("add", {"a": 1, "b": 2}, "c0"), tool_call("mul", '{"a": 3, "b": 4}', "c1")], "tool_calls"
    if n_tool == 2:
        return None, [tool_call("mul", "{not json", "c2"), tool_call("nope/../x", {}, "c3")], "tool_calls"
    return "done: 12", None, "stop"


def test_agent_loop_runs_tools_and_carries_ids(fleet):
    with serve_in_thread(scripted_engine(calculator_script)) as engine_url:
        rows = Env(fleet["calculator"].config, "").dataset(2)
        samples, metrics = collect_batch_sync(fleet, [engine_url], rows, group_size=2, batch_groups=2,
                                              concurrency=4, progress=False)
    assert metrics["rollouts_failed"] == 0 and len(samples) == 4
    s = samples[0]
    s.validate()
    assert s.num_turns == 3 and s.meta["tool_calls"] == 4 and s.meta["stop_reason"] == "done"
    assert s.meta["finish_reasons"] == ["tool_calls", "tool_calls", "stop"]
    assert s.meta["verify"]["tool_calls_made"] >= 2  # the session saw the calls that reached the server
    assert s.reward == (1.0 if rows[s.prompt_index]["expected_answer"] == 12 else 0.0)


def test_agent_loop_feeds_tool_results_and_errors(fleet):
    seen = []

    def script(msgs, body):
        seen.append(msgs)
        return calculator_script(msgs, body)

    with serve_in_thread(scripted_engine(script)) as engine_url:
        rows = Env(fleet["calculator"].config, "").dataset(1)
        collect_batch_sync(fleet, engine_url, rows, group_size=1, batch_groups=1, progress=False)
    last = seen[-1]
    tools = [m for m in last if m["role"] == "tool"]
    assert json.loads(tools[0]["content"]) == {"result": 3} and json.loads(tools[1]["content"]) == {"result": 12}
    assert "Invalid tool call arguments" in tools[2]["content"] and "invalid tool name" in tools[3]["content"]
    carried = [m for m in last if m["role"] == "assistant"]
    assert all(m["prompt_token_ids"] and m["generation_token_ids"] for m in carried)
    assert carried[0]["tool_calls"][0]["function"]["name"] == "add"


def test_dynamic_sampling_filters_equal_reward_groups(fleet, tmp_path):
    def script(msgs, body):
        # the sampling seed encodes prompt and sample index: even prompts are always solved (all rewards
        # equal: filtered), odd prompts only by their first sample (kept)
        prompt, sample, _ = unpack_rollout_seed(body["seed"], 0)
        return ("3" if prompt % 2 == 0 or sample == 0 else "50"), None, "stop"

    rows = Env(fleet["guess"].config, "").dataset(12)
    for i, r in enumerate(rows):
        r["target"], r["row_id"] = 3, i
    requeued: list[dict] = []
    with serve_in_thread(scripted_engine(script)) as engine_url:
        samples, m = collect_batch_sync(fleet, engine_url, rows, group_size=4, batch_groups=2,
                                        sampling={"seed": 0, "max_tokens": 8}, dynamic_sampling=True,
                                        progress=False, jsonl_path=tmp_path / "log.jsonl", requeue=requeued.extend)
    assert m["groups"] == 2 and m["batch_full"]
    by_group = {}
    for s in samples:
        by_group.setdefault(s.group_id, []).append(s.reward)
    assert len(by_group) == 2 and all(len(set(r)) > 1 for r in by_group.values())
    assert m["groups_filtered"] >= 1
    logged = read_jsonl(tmp_path / "log.jsonl")
    assert len(logged) >= m["rollouts_finished"] - 1 and len(logged) >= len(samples)
    # Every candidate row is accounted for exactly once: trained, filtered for zero signal, or requeued
    # (rows cut short or never launched come back, in order, instead of being lost).
    trained = {s.prompt_index for s in samples}
    requeued_ids = [r["row_id"] for r in requeued]
    assert requeued_ids == sorted(requeued_ids) and m["rows_requeued"] == len(requeued)
    filtered = set(range(len(rows))) - trained - set(requeued_ids)
    assert len(filtered) == m["groups_filtered"] and all(i % 2 == 0 for i in filtered)
    assert not trained & set(requeued_ids) and all(i % 2 == 1 for i in trained)
    assert len(requeued) >= len(rows) - 6      # three groups at a time: the batch fills long before row 6


def test_batch_comes_in_row_order_whatever_finishes_first(fleet):
    """The first row's rollouts answer last, yet the batch lists groups in row order: the trainer's
    micro-batches (and so its float sums) must not depend on timing, or a resumed run drifts."""
    import asyncio

    app = scripted_engine(lambda m, b: ("3", None, "stop"))

    @app.middleware("http")
    async def slower_for_earlier_rows(request, call_next):
        prompt, _, _ = unpack_rollout_seed(json.loads(await request.body())["seed"], 0)
        await asyncio.sleep(0.3 * (2 - prompt))
        return await call_next(request)

    rows = Env(fleet["guess"].config, "").dataset(3)
    for r in rows:
        r["target"] = 3
    with serve_in_thread(app) as engine_url:
        samples, m = collect_batch_sync(fleet, engine_url, rows, group_size=2, batch_groups=3, concurrency=8,
                                        sampling={"seed": 0, "max_tokens": 8}, progress=False)
    assert m["rollouts_failed"] == 0
    assert [s.prompt_index for s in samples] == [0, 0, 1, 1, 2, 2]
    assert [s.group_id for s in samples] == sorted(s.group_id for s in samples)


def test_rollout_seeds_never_collide():
    seeds = {rollout_seed(1234, p, s, t) for p in range(64) for s in range(32) for t in range(6)}
    assert len(seeds) == 64 * 32 * 6 and all(0 <= x < 2 ** 63 for x in seeds)
    assert unpack_rollout_seed(rollout_seed(2 ** 63 - 5, 17, 11, 3), 2 ** 63 - 5) == (17, 11, 3)
    with pytest.raises(ValueError, match="sample_index"):
        rollout_seed(0, 0, 1 << 16, 0)


def test_contiguity_violation_is_a_reported_failure(fleet):
    def tamper(message, msgs):
        if any(m.get("generation_token_ids") for m in msgs):
            message["prompt_token_ids"][1] = 999  # the server rewrote history

    app = scripted_engine(lambda m, b: ("7", None, "stop"), tamper=tamper)
    with serve_in_thread(app) as engine_url:
        rows = Env(fleet["guess"].config, "").dataset(1)
        rows[0]["target"] = 50
        samples, m = collect_batch_sync(fleet, engine_url, rows, group_size=1, batch_groups=1, progress=False)
    assert not samples and m["failures"][0]["stage"] == "contiguity"
    assert "first difference at position 1" in m["failures"][0]["error"]


@pytest.mark.parametrize("mode,needle", [("non_json", "non-JSON"), ("no_reward", "no 'reward' field"),
                                         ("bad_reward", "must be a number"), ("http500", "HTTP 500")])
def test_malformed_env_reply_is_a_clear_error(mode, needle):
    with serve_in_thread(scripted_engine(lambda m, b: ("1", None, "stop"))) as engine_url, \
            serve_in_thread(faulty_env(mode)) as env_url:
        env = Env(EnvConfig(name="faulty", url=env_url), env_url)
        rows = [{"responses_create_params": {"input": "hi"}}]
        samples, m = collect_batch_sync({"faulty": env}, engine_url, rows, group_size=2, batch_groups=1,
                                        progress=False, retries=0)
    assert not samples and m["rollouts_failed"] == 2 and not m["batch_full"]
    assert all(needle in f["error"] for f in m["failures"]), m["failures"]
    assert {f["stage"] for f in m["failures"]} <= {"env_protocol", "verify"}


def test_tool_5xx_fails_the_rollout_but_4xx_is_the_tool_output():
    def script(msgs, body):
        if any(m["role"] == "tool" for m in msgs):
            return "done", None, "stop"
        a = json.loads(msgs[0]["content"])["a"]
        return None, [tool_call("add", {"a": a, "b": 1})], "tool_calls"

    with serve_in_thread(scripted_engine(script)) as engine_url, serve_in_thread(faulty_env("ok")) as env_url:
        env = Env(EnvConfig(name="faulty", url=env_url, agent=AgentConfig(max_turns=3)), env_url)
        rows = [{"responses_create_params": {"input": json.dumps({"a": a})}} for a in (2, "x", -1)]
        samples, m = collect_batch_sync({"faulty": env}, engine_url, rows, group_size=1, batch_groups=3,
                                        progress=False, retries=1)
    assert sorted(s.prompt_index for s in samples) == [0, 1]          # 422: the text goes back to the model
    assert m["rollouts_failed"] == 1 and m["failures"][0]["prompt_index"] == 2
    assert m["failures"][0]["stage"] == "tool" and "HTTP 500" in m["failures"][0]["error"]
    assert m["per_env"]["faulty"]["rollouts_failed"] == 1 and m["per_env"]["faulty"]["rollouts_finished"] == 2


def test_nemo_gym_context_overflow_is_named():
    """NeMo Gym's vllm_model turns an engine's context-length 400 into an empty "length" completion: the
    rollout fails at stage "context" with the fix in the message, not as a protocol error."""
    app = FastAPI()

    @app.post("/run")
    async def run():
        return {"reward": 0.0, "response": {"output": [{"type": "message", "role": "assistant", "content": []}],
                                            "incomplete_details": {"reason": "max_output_tokens"}}}

    with serve_in_thread(app) as agent_url:
        env = Env(EnvConfig(name="gym", url=agent_url, type="nemo_gym"), agent_url)
        rows = [{"responses_create_params": {"input": "a very long prompt"}}]
        samples, m = collect_batch_sync({"gym": env}, "http://127.0.0.1:9", rows, group_size=1, batch_groups=1,
                                        progress=False, retries=0)
    assert not samples and m["failures"][0]["stage"] == "context"
    assert "--context-length" in m["failures"][0]["error"]


def test_env_timeout_does_not_hang():
    with serve_in_thread(scripted_engine(lambda m, b: ("1", None, "stop"))) as engine_url, \
            serve_in_thread(faulty_env("slow", delay_s=30)) as env_url:
        cfg = EnvConfig(name="slow", url=env_url)
        cfg.agent.env_timeout_s = 0.5
        env = Env(cfg, env_url)
        t0 = time.monotonic()
        samples, m = collect_batch_sync({"slow": env}, engine_url, [{"responses_create_params": {"input": "x"}}],
                                        group_size=2, batch_groups=1, progress=False, retries=1)
        took = time.monotonic() - t0
    assert took < 5, took
    assert m["rollouts_failed"] == 2 and m["failures"][0]["stage"] == "verify"
    assert "ReadTimeout" in m["failures"][0]["error"]


def test_rollout_timeout_bounds_a_rollout():
    with serve_in_thread(scripted_engine(lambda m, b: ("1", None, "stop"))) as engine_url, \
            serve_in_thread(faulty_env("slow", delay_s=30)) as env_url:
        env = Env(EnvConfig(name="slow", url=env_url), env_url)
        t0 = time.monotonic()
        _, m = collect_batch_sync({"slow": env}, engine_url, [{"responses_create_params": {"input": "x"}}],
                                  group_size=1, batch_groups=1, progress=False, rollout_timeout_s=1.0)
        took = time.monotonic() - t0
    assert took < 5 and m["failures"][0]["stage"] == "timeout"


# --- spin-up cleanup -------------------------------------------------------------------------------
def test_fleet_stop_leaves_no_process():
    f = EnvFleet(select(load_config(CONFIG), ["arithmetic", "guess"])).start()
    pids = f.pids()
    assert len(pids) == 2 and all(httpx.get(e.url + "/health").status_code == 200 for e in f)
    f.stop()
    assert wait_dead(pids) == []


def test_startup_failure_cleans_up():
    cfgs = load_config(CONFIG, ["guess.entrypoint=sglgym.rollout.envs.guess:NoSuchEnv"])
    with pytest.raises(RuntimeError, match="exited"):
        EnvFleet(select(cfgs, ["arithmetic", "guess"])).start()


SCRIPT = textwrap.dedent("""
    import sys, time
    from sglgym.rollout import EnvFleet, load_config, select
    with EnvFleet(select(load_config(sys.argv[1]), ["arithmetic", "calculator"])) as f:
        print(" ".join(map(str, f.pids())), flush=True)
        time.sleep(120)
""")


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM, signal.SIGKILL])
def test_interrupted_parent_leaves_no_process(sig, tmp_path):
    script = tmp_path / "hold.py"
    script.write_text(SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(CONFIG)], stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        pids = [int(p) for p in proc.stdout.readline().split()]
        assert len(pids) == 2 and set(pids) <= set(children_of(proc.pid))
        os.kill(proc.pid, sig)   # Ctrl-C, a polite kill, and a hard kill (PDEATHSIG takes over)
        proc.wait(timeout=60)   # stopping two env servers may take 2 x (10 s grace + 5 s) by design
        assert wait_dead(pids) == []
    finally:
        if proc.poll() is None:
            proc.kill()


def test_a_break_in_nemo_gym_history_splits_the_rollout():
    """Measured with NeMo Gym 0.4.0's multi-turn agent (1 of 392 rollouts of the tiny model): a turn that
    generated only the turn-end token leaves no assistant message, so the next prompt drops it. Strict
    tracking fails the rollout; NeMo Gym's path splits it there and trains each segment on its own."""
    import torch

    from sglgym.trainer.batches import make_micro_batches, segments

    turn1_prompt, turn1_gen = [1, 40, 41, 2, 201, 1, 315, 201], [2]          # generated: the turn end only
    turn2_prompt = [1, 40, 41, 2, 201, 1, 320, 201, 48, 2, 201, 1, 315, 201]  # a user turn; no assistant message
    strict = TokenTracker()
    strict.add_turn(turn1_prompt, turn1_gen, [-0.5])
    with pytest.raises(ContiguityError, match="turn 1"):
        strict.add_turn(turn2_prompt, [60, 2], [-1.0, -0.1])

    split = TokenTracker(split_on_break=True)
    split.add_turn(turn1_prompt, turn1_gen, [-0.5])
    split.add_turn(turn2_prompt, [60, 2], [-1.0, -0.1])
    split.add_turn(turn2_prompt + [60, 2, 201, 7], [61], [-2.0])                # contiguous again: same segment
    sample = split.to_sample(reward=1.0, group_id=0, prompt_index=0, truncated=False, env="e", engine_url="")
    sample.validate()
    assert sample.segment_starts == [9] and sample.num_turns == 3
    first, second = segments(sample)
    assert first.token_ids == turn1_prompt + turn1_gen and first.loss_mask == [0] * 8 + [1]
    assert second.token_ids == turn2_prompt + [60, 2, 201, 7, 61]
    assert second.turn_spans == [(14, 16), (18, 19)] and sum(second.loss_mask) == 3
    # the trainer packs the two segments as two sequences with the rollout's advantage
    together = make_micro_batches([sample], [0.7])
    apart = make_micro_batches([first, second], [0.7, 0.7])
    assert len(together) == len(apart) == 1
    for key in ("target_ids", "loss_mask", "gen_logprobs", "advantages", "cu_seqlens", "input_ids"):
        assert torch.equal(getattr(together[0], key), getattr(apart[0], key)), key
