"""Scale-out: two CPU engines as data-parallel replicas, as a URL list and behind sglang-router; every
turn of a rollout stays on one engine."""

from __future__ import annotations

import threading
from pathlib import Path

import httpx
import pytest

from conftest import start_engine, stop_engine
from rollout.helpers import requests_served
from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.rollout import EnvFleet, collect_batch_sync, load_config, select
from sglgym.rollout.engines import start_router
from sglgym.rollout.spinup import stop_process

CONFIG = DEFAULT_CONFIG
SAMPLING = {"temperature": 1.0, "top_p": 1.0, "max_tokens": 8}


@pytest.fixture(scope="module")
def two_engines():
    engines, errors = [None, None], []

    def boot(i):
        try:
            engines[i] = start_engine(f"replica{i}", ["--enable-metrics"])
        except Exception as e:  # noqa: BLE001 - re-raised below
            errors.append(e)

    threads = [threading.Thread(target=boot, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    try:
        if errors:
            raise errors[0]
        yield engines
    finally:
        for e in engines:
            if e is not None:
                stop_engine(e)


@pytest.fixture(scope="module")
def guess_fleet():
    with EnvFleet(select(load_config(CONFIG, ["guess.agent.max_turns=3"]), ["guess"])) as f:
        yield f


def test_url_list_pins_every_turn_to_one_engine(two_engines, guess_fleet):
    e0, e1 = two_engines
    before = {e.base_url: requests_served(e) for e in two_engines}
    rows = guess_fleet["guess"].dataset(8, seed=9)
    samples, m = collect_batch_sync(guess_fleet, [e0.base_url, e1.base_url], rows, group_size=2, batch_groups=8,
                                    sampling=SAMPLING, concurrency=16, api_key=e0.api_key, progress=False)
    assert m["rollouts_failed"] == 0 and len(samples) == 16
    used = {s.engine_url for s in samples}
    assert used == {e0.base_url, e1.base_url}          # both replicas took rollouts
    assert sum(m["engine_rollouts"].values()) == 16
    # Each engine served exactly the turns of the rollouts pinned to it: no turn went elsewhere.
    for e in two_engines:
        turns = sum(s.num_turns for s in samples if s.engine_url == e.base_url)
        assert requests_served(e) - before[e.base_url] == turns, e.base_url


def test_router_url_discovers_replicas_and_keeps_turns_together(two_engines, guess_fleet):
    pytest.importorskip("sglang_router", reason="sglang-router (PyPI) is not installed")
    e0, e1 = two_engines
    router = start_router([e0.base_url, e1.base_url], api_key=e0.api_key)
    try:
        before = {e.base_url: requests_served(e) for e in two_engines}
        rows = guess_fleet["guess"].dataset(4, seed=10)
        samples, m = collect_batch_sync(guess_fleet, router.url, rows, router=True, group_size=2, batch_groups=4,
                                        sampling=SAMPLING, concurrency=8, api_key=e0.api_key, progress=False)
    finally:
        stop_process(router)
    assert m["rollouts_failed"] == 0, m["failures"][:2]
    assert {s.engine_url for s in samples} == {e0.base_url, e1.base_url}
    assert all(s.num_turns >= 2 for s in samples if s.meta["stop_reason"] != "done")
    for e in two_engines:
        turns = sum(s.num_turns for s in samples if s.engine_url == e.base_url)
        assert requests_served(e) - before[e.base_url] == turns
