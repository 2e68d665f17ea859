"""Rollouts against a live `sglgym serve` (tiny model, CPU) and live environment servers."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil
import pytest

from rollout.helpers import wait_dead
from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.rollout import EnvFleet, collect_batch_sync, load_config, read_jsonl, select
from sglgym.rollout.responses import to_chat_messages, to_chat_tools

REPO = Path(__file__).resolve().parents[1]
CONFIG = DEFAULT_CONFIG
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 12}


@pytest.fixture(scope="module")
def fleet():
    cfgs = load_config(CONFIG, ["guess.agent.max_turns=4", "calculator.agent.max_turns=3"])
    with EnvFleet(select(cfgs, ["arithmetic", "calculator", "guess"])) as f:
        yield f


def _collect(fleet, engine, rows, **kw):
    kw.setdefault("sampling", SAMPLING)
    kw.setdefault("progress", False)
    return collect_batch_sync(fleet, [engine.base_url], rows, api_key=engine.api_key, **kw)


def _check_samples(samples, engine):
    for s in samples:
        s.validate()
        assert s.engine_url == engine.base_url
        assert all(lp <= 0.0 for lp, m in zip(s.gen_logprobs, s.loss_mask) if m)
        assert all(end - start <= SAMPLING["max_tokens"] for start, end in s.turn_spans)


def test_single_turn_rollouts_match_engine_ids(fleet, engine, tokenizer):
    rows = fleet["arithmetic"].dataset(4, seed=11)
    samples, m = _collect(fleet, engine, rows, group_size=2, batch_groups=4, concurrency=8)
    assert m["rollouts_failed"] == 0 and m["batch_full"] and len(samples) == 8
    _check_samples(samples, engine)
    for s in samples:
        assert s.num_turns == 1 and s.reward in (0.0, 1.0) and s.env == "arithmetic"
        # the prompt part is exactly what the engine's template gives for the row's messages
        messages = to_chat_messages(rows[s.prompt_index]["responses_create_params"]["input"])
        with engine.client() as c:
            ids = c.post("/tokenize", json={"messages": messages}).json()["tokens"]
        assert s.token_ids[: s.prompt_len] == ids
    assert sorted({s.group_id for s in samples}) == [0, 1, 2, 3]
    for key in ("reward_mean", "reward_std", "turns_mean", "tokens_mean", "truncation_rate", "tokens_per_s",
                "gen_tokens_per_s", "wall_s"):
        assert key in m


def test_multi_turn_contiguity_over_32_rollouts(fleet, engine, tokenizer):
    rows = fleet["guess"].dataset(8, seed=3)
    samples, m = _collect(fleet, engine, rows, group_size=4, batch_groups=8, concurrency=32,
                          decode=tokenizer.decode)
    # any non-contiguous turn would have failed its rollout with stage "contiguity"
    assert m["rollouts_failed"] == 0, m["failures"][:3]
    assert m["rollouts_split"] == 0   # the carried ids keep every history append-only
    assert len(samples) == 32 and m["batch_full"]
    _check_samples(samples, engine)
    multi = [s for s in samples if s.num_turns >= 2]
    assert len(multi) >= 28, [s.meta["stop_reason"] for s in samples]
    assert m["turns_mean"] > 2
    for s in multi:
        # the environment's replies sit between the turns, outside the loss mask
        between = tokenizer.decode([t for t, mk in zip(s.token_ids[s.prompt_len:], s.loss_mask[s.prompt_len:])
                                    if mk == 0])
        assert any(w in between for w in ("higher", "lower", "Reply with a number")), between
        assert s.truncated == (s.meta["stop_reason"] != "done")


def test_plain_message_history_splits_where_it_breaks(engine, tokenizer):
    """`agent.carry_token_ids: false` sends plain messages back (template-faithful history, prime-rl
    style): where re-templating gives other ids than the model produced, the rollout goes on as a new
    sequence instead of failing, and the trainer sees each segment on its own."""
    cfgs = load_config(CONFIG, ["guess.agent.max_turns=4", "guess.agent.carry_token_ids=false"])
    with EnvFleet(select(cfgs, ["guess"])) as f:
        rows = f["guess"].dataset(4, seed=3)
        samples, m = _collect(f, engine, rows, group_size=4, batch_groups=4, concurrency=16,
                              decode=tokenizer.decode)
    assert m["rollouts_failed"] == 0, m["failures"][:3]
    split = [s for s in samples if s.segment_starts]
    assert m["rollouts_split"] == len(split) > 0
    for s in split:
        s.validate()
        for start in s.segment_starts:   # a segment opens with a prompt (not trained on) before its turn
            assert s.loss_mask[start] == 0 and any(a <= start < b for a, b in s.turn_spans) is False


def test_aborted_generation_fails_the_rollout(fleet, engine):
    """SGLang aborting a request mid-generation (finish_reason "abort"): its partial tokens are not a turn
    to train on; the rollout fails at stage "engine"."""
    import threading
    import time

    def abort_soon():
        time.sleep(3.0)
        with engine.client() as c:
            c.post("/abort_request", json={"abort_all": True})

    rows = fleet["arithmetic"].dataset(1, seed=5)
    aborter = threading.Thread(target=abort_soon)
    aborter.start()
    samples, m = _collect(fleet, engine, rows, group_size=2, batch_groups=1, concurrency=2,
                          sampling={"temperature": 1.0, "max_tokens": 1900, "ignore_eos": True})
    aborter.join()
    assert samples == [] and m["rollouts_failed"] == 2, m
    assert all(f["stage"] == "engine" and "abort" in f["error"] for f in m["failures"]), m["failures"]


def test_tool_env_rollouts_complete(fleet, engine, tokenizer):
    rows = fleet["calculator"].dataset(3, seed=2)
    samples, m = _collect(fleet, engine, rows, group_size=2, batch_groups=3, concurrency=6)
    assert m["rollouts_failed"] == 0 and len(samples) == 6
    _check_samples(samples, engine)
    text = tokenizer.decode(samples[0].token_ids[: samples[0].prompt_len])
    assert "<tools>" in text and '"name": "add"' in text
    assert all(s.reward in (0.0, 1.0) for s in samples)
    # the calculator tools reach the engine in chat format
    assert to_chat_tools(rows[0]["responses_create_params"]["tools"])[1]["function"]["name"] == "mul"


def test_env_killed_mid_batch(engine, tmp_path):
    cfgs = load_config(CONFIG, ["guess.agent.max_turns=6"])
    log = tmp_path / "rollouts.jsonl"
    with EnvFleet(select(cfgs, ["arithmetic", "guess"])) as f:
        rows = []
        for a, g in zip(f["arithmetic"].dataset(3), f["guess"].dataset(3)):
            rows += [a, g]
        guess_pid = f["guess"].server.pid

        def killer():
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                if log.exists() and log.read_text().count("\n") >= 1:
                    os.killpg(guess_pid, signal.SIGKILL)
                    return
                time.sleep(0.05)

        t = threading.Thread(target=killer, daemon=True)
        t.start()
        t0 = time.monotonic()
        samples, m = collect_batch_sync(f, [engine.base_url], rows, api_key=engine.api_key, group_size=2,
                                        batch_groups=6, sampling={**SAMPLING, "max_tokens": 16}, concurrency=12,
                                        progress=False, jsonl_path=log, retries=1)
        took = time.monotonic() - t0
        t.join()
    assert took < 120
    assert m["failures"], "killing the guess server should fail its rollouts"
    assert {f["env"] for f in m["failures"]} == {"guess"}
    assert all(f["stage"] in ("seed_session", "step", "verify") for f in m["failures"])
    assert all("guess" in f["error"] for f in m["failures"])
    assert sum(1 for s in samples if s.env == "arithmetic") == 6   # the other env's groups all completed
    assert not m["batch_full"]
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert sum("failure" in x for x in lines) == len(m["failures"])
    assert len(read_jsonl(log)) == m["rollouts_finished"]          # every finished rollout was exported


def test_cli_starts_engine_and_envs_and_cleans_up(tmp_path):
    before = _env_server_pids()
    out = tmp_path / "samples.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "sglgym.cli", "rollout", "--config", str(CONFIG), "--env", "guess",
         "--group-size", "2", "--batch-groups", "2", "--max-tokens", "8", "--set", "guess.agent.max_turns=3",
         "--set", "guess.params.high=20", "--out", str(out), "--no-progress", "--serve-args",
         "--max-total-tokens 8192"],
        capture_output=True, text=True, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    metrics = json.loads(proc.stdout)
    assert metrics["samples"] == 4 and metrics["groups"] == 2
    samples = read_jsonl(out)
    assert len(samples) == 4 and all(s.num_turns >= 1 and s.env == "guess" for s in samples)
    assert len(read_jsonl(metrics["log"])) == metrics["rollouts_finished"]
    assert wait_dead(_env_server_pids() - before) == []


def _env_server_pids() -> set[int]:
    """Env servers, and engines the rollout CLI starts (`sglgym.cli serve --port P --api-key K`)."""
    out = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = " ".join(p.info["cmdline"] or ())   # None where it may not be read
        if "sglgym.rollout.envs.serve" in cmd or re.search(r"sglgym\.cli serve --port \d+ --api-key", cmd):
            out.add(p.pid)
    return out
