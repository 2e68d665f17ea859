"""Real NeMo Gym (nemo-gym from PyPI, its own Python 3.12 venv, installed here on first use): its resources
server, agent and vllm_model server, pointed at our engine; rollouts collected through the agent's /run."""

from __future__ import annotations

import json
import os

import pytest

from conftest import start_engine, stop_engine
from rollout.helpers import requests_served, wait_dead
from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.rollout import EnvFleet, collect_batch_sync, load_config, select
from sglgym.procs import descendants
from sglgym.rollout.nemo_gym import ensure_venv, find_python312

CONFIG = DEFAULT_CONFIG

pytestmark = pytest.mark.timeout(1800)  # the first run installs nemo-gym and NeMo Gym's per-server venvs


@pytest.fixture(scope="module")
def nemo_gym_venv():
    if find_python312() is None:
        if os.environ.get("CI"):    # never a silent skip in CI
            pytest.fail("nemo-gym needs Python >= 3.12 and none was found (set SGLGYM_PYTHON312)")
        pytest.skip("nemo-gym needs Python >= 3.12: none found (set SGLGYM_PYTHON312)")
    return ensure_venv()    # pip install nemo-gym==0.4.0 uv into a 3.12 venv, once


def _run(engine, name: str, rows_n: int, group_size: int, batch_groups: int, engine_urls=None):
    urls = engine_urls or [engine.base_url]
    fleet = EnvFleet(select(load_config(CONFIG), [name]), engine_urls=urls, api_key=engine.api_key)
    with fleet:
        tree = set()
        for run in fleet.extra_servers:
            tree |= descendants(run.server.pid) | {run.server.pid}
        rows = fleet[name].dataset(rows_n)
        samples, m = collect_batch_sync(fleet, urls, rows, group_size=group_size,
                                        batch_groups=batch_groups, sampling={"max_tokens": 12}, progress=False)
    assert tree and wait_dead(tree, 60) == [], "NeMo Gym processes left behind"
    return rows, samples, m


def test_nemo_gym_simple_agent_with_tools(nemo_gym_venv, engine):
    rows, samples, m = _run(engine, "nemo_gym_weather", 2, 2, 2)
    assert m["rollouts_failed"] == 0, m["failures"][:2]
    assert len(samples) == 4
    for s in samples:
        s.validate()
        assert s.reward == 1.0 and s.num_turns >= 1 and s.engine_url == engine.base_url  # its verify gives 1.0


def test_nemo_gym_multi_turn_is_contiguous(nemo_gym_venv, engine, tokenizer):
    rows, samples, m = _run(engine, "nemo_gym_multi_turn", 3, 2, 3)
    assert m["rollouts_failed"] == 0, m["failures"][:2]    # a non-contiguous turn fails with "contiguity"
    assert len(samples) == 6
    for s in samples:
        s.validate()
        follow_ups = rows[s.prompt_index]["follow_ups"]
        assert s.num_turns == len(follow_ups) + 1           # one model call per user message
        text = tokenizer.decode(s.token_ids)
        assert all(f in text for f in follow_ups)


def test_nemo_gym_rollouts_spread_over_every_replica(nemo_gym_venv, engine):
    """Two engines: NeMo Gym's model server gets both URLs and pins each rollout (its session) to one;
    between them they served exactly the rollouts' model calls, and our pool lent no slot to them."""
    extra = start_engine("nemo-replica", ["--enable-metrics"])
    try:
        replicas = [engine, extra]
        before = [requests_served(e) for e in replicas]
        rows, samples, m = _run(engine, "nemo_gym_multi_turn", 4, 2, 4, engine_urls=[e.base_url for e in replicas])
        served = [requests_served(e) - b for e, b in zip(replicas, before)]
    finally:
        stop_engine(extra)
    assert m["rollouts_failed"] == 0, m["failures"][:2]
    assert len(samples) == 8 and all(s.engine_url == "" for s in samples)   # Gym picks; it does not say which
    assert all(n > 0 for n in served), served
    assert sum(served) == sum(s.num_turns for s in samples)
    assert sum(m["engine_rollouts"].values()) == 0          # no slot of ours held by a NeMo Gym rollout


def test_sglgym_train_on_nemo_gym_env(nemo_gym_venv, engine, control, restore_engine, tmp_path):
    """`sglgym train --set env=nemo_gym_multi_turn`: rows from NeMo Gym's JSONL, rollouts through its agent,
    model server and resources server, the ids its model server carried, trained and refit."""
    from sglgym.trainer.cli import main

    out = tmp_path / "nemo"
    summary = main([
        "--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(out),
        "--set", "env=nemo_gym_multi_turn", "--set", "steps=2", "--set", "sft_steps=0", "--set", "group_size=2",
        "--set", "batch_groups=2", "--set", "dynamic_sampling=false", "--set", "eval_rows=2",
        "--set", "eval_samples=1", "--set", "probe_every=1", "--set", "time_budget_s=null", "--set", "max_tokens=12",
    ])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2]
    failures = (out / "failures.jsonl").read_text() if (out / "failures.jsonl").exists() else ""
    for m in lines:
        assert m["rollout_failures"] == 0, failures[:2000]
        assert m["samples/nemo_gym_multi_turn"] == 4   # contiguity checked per turn
        assert m["probe_ok"] and m["token_mult_prob_error"] <= 1.05
    assert control.weight_version() == "step-2"
    assert 0.0 <= summary["reward_after"] <= 1.0


def test_async_train_on_nemo_gym_env(nemo_gym_venv, engine, control, restore_engine, tmp_path):
    """`--set max_staleness=1` on a NeMo Gym env: step t+1's rollouts run through NeMo Gym's servers while
    step t trains and refits (the engine pauses, flushes and continues; no request is lost), and every
    trained token is at most one version old."""
    from sglgym.trainer.cli import main

    out = tmp_path / "nemo-async"
    main([
        "--engine-url", engine.base_url, "--api-key", engine.api_key, "--out", str(out),
        "--set", "env=nemo_gym_multi_turn", "--set", "steps=3", "--set", "sft_steps=0", "--set", "group_size=2",
        "--set", "batch_groups=2", "--set", "dynamic_sampling=false", "--set", "eval_rows=2", "--set", "max_staleness=1",
        "--set", "eval_samples=1", "--set", "probe_every=1", "--set", "time_budget_s=null", "--set", "max_tokens=12",
    ])
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    failures = (out / "failures.jsonl").read_text() if (out / "failures.jsonl").exists() else ""
    for m in lines:
        assert m["rollout_failures"] == 0, failures[:2000]
        assert m["samples/nemo_gym_multi_turn"] == 4
        assert m["probe_ok"] and m["staleness_max"] <= 1 and m["dropped_stale_frac"] == 0
        assert m["weight_version"] == m["step"] - 1     # trains from the weights of the step before
    assert max(m["staleness_max"] for m in lines) == 1   # generated ahead: a later step used older weights
    assert control.weight_version() == "step-3"


def test_dead_nemo_gym_server_is_restarted(nemo_gym_venv, engine):
    """One of NeMo Gym's servers dies (its resources server, SIGKILL): rollouts fail; the fleet's
    `restart_dead` (what the trainer's recovery calls) starts the whole `gym env start` again on the same
    ports, the old process tree is gone, and rollouts succeed again."""
    import signal

    import psutil

    fleet = EnvFleet(select(load_config(CONFIG), ["nemo_gym_multi_turn"]), engine_urls=[engine.base_url],
                     api_key=engine.api_key)
    collect = lambda: collect_batch_sync(fleet, [engine.base_url], fleet["nemo_gym_multi_turn"].dataset(2),  # noqa: E731
                                         group_size=1, batch_groups=2, sampling={"max_tokens": 12}, progress=False)
    with fleet:
        run = fleet.extra_servers[0]
        assert fleet.restart_dead() == []                     # all up: nothing restarted
        port = run.ports["example_multi_turn_gymnasium"]      # the resources server
        victim = next(c.pid for c in psutil.net_connections("tcp")
                      if c.laddr and c.laddr.port == port and c.status == psutil.CONN_LISTEN)
        old_tree = descendants(run.server.pid) | {run.server.pid}
        os.kill(victim, signal.SIGKILL)
        _, m = collect()
        assert m["rollouts_failed"] == 2
        assert fleet.restart_dead() == ["nemo_gym_multi_turn"]
        assert wait_dead(old_tree - {victim}, 60) == []
        assert run.healthy() and fleet.restart_dead() == []
        samples, m = collect()
        assert m["rollouts_failed"] == 0, m["failures"][:2]
        assert len(samples) == 2
