"""Training rows: several envs mixed by weight, and rows handed back by dynamic sampling served first."""

from __future__ import annotations

from collections import Counter

import pytest

from sglgym.rollout import Env, load_config, select
from sglgym.rollout.config import DEFAULT_CONFIG
from sglgym.trainer.config import load_train_config
from sglgym.trainer.rows import RowSource


@pytest.fixture(scope="module")
def envs():
    cfgs = select(load_config(DEFAULT_CONFIG), ["arithmetic", "calculator", "guess"])
    return {name: Env(cfg, "") for name, cfg in cfgs.items()}   # datasets only: no server needed


def _env(row: dict) -> str:
    return row["agent_ref"]["name"]


def test_weights_hold_exactly_over_every_window(envs):
    source = RowSource(envs, {"arithmetic": 0.5, "calculator": 0.3, "guess": 0.2}, seed=3, chunk=7)
    rows = source.take(100)
    for start in range(0, 100, 10):
        assert Counter(_env(r) for r in rows[start:start + 10]) == {"arithmetic": 5, "calculator": 3, "guess": 2}
    # each env's rows are its own seeded train rows, continuing across chunks without repeats in a chunk
    arithmetic = [r for r in rows if _env(r) == "arithmetic"]
    assert arithmetic[:7] == envs["arithmetic"].dataset(7, seed=3, split="train")
    assert arithmetic[7:14] == envs["arithmetic"].dataset(7, seed=4, split="train")


def test_requeued_rows_come_back_first_in_order(envs):
    source = RowSource(envs, {"guess": 1.0}, seed=0)
    first = source.take(6)
    source.requeue(first[3:])
    again = source.take(4)
    assert again[:3] == first[3:] and again[3] not in first and source.pending == 0
    source.requeue([first[0]])
    source.requeue([first[1]])          # handed back later: served first
    assert source.take(2) == [first[1], first[0]]


def test_unknown_env_and_bad_weights_are_named(envs):
    with pytest.raises(KeyError, match="nope"):
        RowSource(envs, {"nope": 1.0})
    cfg = load_train_config(None, ["envs={arithmetic: 1, guess: 3}"])
    assert cfg.env_weights() == {"arithmetic": 0.25, "guess": 0.75}
    assert load_train_config(None, []).env_weights() == {"arithmetic": 1.0}
    for bad in ("envs={arithmetic: 0}", "envs={guess: fast}", "envs.guess=-1"):
        with pytest.raises(ValueError, match="envs.arithmetic|envs.guess"):
            load_train_config(None, [bad])


def test_cursor_state_continues_with_the_same_rows(envs):
    """What a checkpoint keeps of the data: a source rebuilt from `state()` (through JSON) hands out exactly
    the rows the original would have, requeued ones first, across chunk boundaries."""
    import json

    weights = {"arithmetic": 0.5, "calculator": 0.3, "guess": 0.2}
    source = RowSource(envs, weights, seed=3, chunk=7)
    first = source.take(13)
    source.requeue(first[10:12])
    state = json.loads(json.dumps(source.state()))
    expected = source.take(30)
    restored = RowSource(envs, weights, seed=99, chunk=7)   # another seed: the state must override it
    restored.load_state(state)
    assert restored.take(30) == expected
    assert expected[:2] == first[10:12]
    fresh = RowSource(envs, weights, seed=3, chunk=7)
    fresh.load_state(json.loads(json.dumps(RowSource(envs, weights, seed=3, chunk=7).state())))
    assert fresh.take(5) == RowSource(envs, weights, seed=3, chunk=7).take(5)   # a cursor before any row
