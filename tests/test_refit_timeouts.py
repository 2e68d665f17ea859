"""Nothing hangs: an engine that joins the weight-update group and then stops answering (SIGSTOP of its
whole process tree: HTTP server, scheduler, detokenizer) makes the refit raise within its timeout, naming
the engine and the phase; so does one that never joins."""

from __future__ import annotations

import time

import psutil
import pytest
from conftest import start_engine, stop_engine

from sglgym.trainer.refit import DistributedRefit, EngineControl, RefitError, refit_from_tensor

TIMEOUT_S = 4.0


@pytest.fixture(scope="module")
def spare_engine():
    engine = start_engine("hang")
    yield engine
    stop_engine(engine)


def _tree(engine) -> list[psutil.Process]:
    root = psutil.Process(engine.server.pid)
    return [root, *root.children(recursive=True)]


def _frozen(engine):
    class Frozen:
        def __enter__(self):
            self.procs = _tree(engine)
            for p in self.procs:
                p.suspend()

        def __exit__(self, *exc):
            for p in self.procs:
                p.resume()
    return Frozen()


def test_engine_that_stops_answering_after_init_group_raises_naming_the_phase(spare_engine, tiny_model_path):
    from sglgym.trainer.policy import HFPolicy

    named = HFPolicy(tiny_model_path).named_tensors()
    control = EngineControl(spare_engine.base_url, spare_engine.api_key, timeout_s=TIMEOUT_S)
    group = DistributedRefit(control, group_name="sglgym_hang_test")   # the engine joins: init_group answered
    try:
        with _frozen(spare_engine):
            t0 = time.monotonic()
            with pytest.raises(RefitError) as e:
                group.update(named, "never")
            waited = time.monotonic() - t0
        assert e.value.engine_url == spare_engine.base_url and e.value.phase == "pause"
        assert "did not answer within 4s" in str(e.value) and spare_engine.base_url in str(e.value)
        assert waited < 3 * TIMEOUT_S, waited                         # bounded: the pause and one continue try
        with _frozen(spare_engine), pytest.raises(RefitError) as e:
            refit_from_tensor(control, named, "never")                  # the tensor path too
        assert e.value.phase == "pause"
    finally:
        control.timeout_s = 60
        control.close()
        group.close()
    assert control.weight_version() != "never"


def test_engine_that_never_joins_the_group_raises_init_group(spare_engine):
    control = EngineControl(spare_engine.base_url, spare_engine.api_key, timeout_s=TIMEOUT_S)
    with _frozen(spare_engine), pytest.raises(RefitError) as e:
        DistributedRefit(control, group_name="sglgym_never_joins")
    assert e.value.phase == "init_group" and e.value.engine_url == spare_engine.base_url
    control.close()


def test_refit_after_a_trainer_killed_mid_refit(control, restore_engine):
    """A trainer SIGKILLed inside a refit leaves the engine paused with its weight-update session open; the
    next trainer's refit (a resumed run's first step) closes that session, updates, and the engine serves."""
    base = restore_engine
    control.post("/pause_generation", {"mode": "retract"})
    control.post("/begin_weight_update")                       # ... and the trainer died here
    refit_from_tensor(control, base.named_tensors(), "after-kill")
    assert control.weight_version() == "after-kill"
    scores = control.score([[1, 5, 9, 13]])                    # generation was continued
    assert len(scores[0]) == 3
