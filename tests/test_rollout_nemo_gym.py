"""Real NeMo Gym (nemo-gym from PyPI, its own Python 3.12 venv, installed here on first use): its resources
server, agent and vllm_model server, pointed at our engine; rollouts collected through the agent's /run."""

from __future__ import annotations

import os

import pytest

from rollout.helpers import wait_dead
from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.rollout import EnvFleet, collect_batch_sync, load_config, select
from sglgym.rollout.nemo_gym import _descendants, ensure_venv, find_python312

CONFIG = DEFAULT_CONFIG

pytestmark = pytest.mark.timeout(1800)  # the first run installs nemo-gym and NeMo Gym's per-server venvs


@pytest.fixture(scope="module")
def nemo_gym_venv():
    if find_python312() is None:
        if os.environ.get("CI"):    # never a silent skip in CI
            pytest.fail("nemo-gym needs Python >= 3.12 and none was found (set SGLGYM_PYTHON312)")
        pytest.skip("nemo-gym needs Python >= 3.12: none found (set SGLGYM_PYTHON312)")
    return ensure_venv()    # pip install nemo-gym==0.4.0 uv into a 3.12 venv, once


def _run(engine, name: str, rows_n: int, group_size: int, batch_groups: int):
    fleet = EnvFleet(select(load_config(CONFIG), [name]), engine_urls=engine.base_url, api_key=engine.api_key)
    with fleet:
        tree = set()
        for run in fleet.extra_servers:
            tree |= _descendants(run.server.pid) | {run.server.pid}
        rows = fleet[name].dataset(rows_n)
        samples, m = collect_batch_sync(fleet, [engine.base_url], rows, group_size=group_size,
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
