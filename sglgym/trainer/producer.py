"""Asynchronous GRPO on rank 0: a thread that collects the batches of later steps while the trainer trains.

With `max_staleness: k` the batch of step t may start once step t-1-k is trained and refit (k = 0 is the
synchronous loop, which does not use this class). The refit after each step happens while the thread's
rollouts are in flight: the engine pauses (retracting them), flushes its prefix cache, loads the weights
and continues, so a request cut mid-generation is prefilled again and finishes under the new weights; one
that SGLang aborts instead is continued by the agent (rollout/turn.py). Every generated token's weight
version is known (`Sample.gen_versions`) and no request reuses KV computed under older weights.
`bound_staleness` then drops any group with a token older than k versions (counted; with the gate above
there should be none).

Only this thread touches the rows cursor once GRPO has started; `cursor_before(step)` is what a
checkpoint after step-1 records, so a resumed run hands out the same rows again.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable

from .rollouts import Rollouts, StepBatch


class RolloutProducer:
    def __init__(self, rollouts: Rollouts, first_step: int, last_step: int, max_staleness: int,
                 version: Callable[[], int]):
        self.rollouts, self.last_step, self.max_staleness, self.version = rollouts, last_step, max_staleness, version
        self.trained = first_step - 1          # the last step trained and refit into the engines
        self.refits = 0                        # refits after an engine restart (the thread waits for one)
        self.cond = threading.Condition()
        self.stopping = False
        self.results: queue.Queue = queue.Queue()
        self.cursors: dict[int, dict] = {}
        self.busy: list[tuple[float, float]] = []   # (start, end) of each batch's generation
        self.generating_since: float | None = None
        self.thread = threading.Thread(target=self._run, args=(first_step,), name="rollout-producer", daemon=True)
        self.thread.start()

    def _wait(self, ready: Callable[[], bool]) -> bool:
        with self.cond:
            self.cond.wait_for(lambda: self.stopping or ready())
            return not self.stopping

    def _run(self, step: int) -> None:
        while step <= self.last_step:
            refits = self.refits
            if not self._wait(lambda: self.trained >= step - 1 - self.max_staleness):
                return
            with self.cond:
                self.cursors[step] = self.rollouts.rows.state()
            version = self.version()
            self.generating_since = t0 = time.perf_counter()
            try:
                batch = self.rollouts.step_batch(step)
            except BaseException as e:    # handed to the trainer, which raises it
                self.results.put((step, e))
                return
            finally:
                self.generating_since = None
            self.busy.append((t0, time.perf_counter()))
            batch.metrics["batch_start_version"] = version
            self.results.put((step, batch))
            if batch.refit_needed:          # an engine was restarted: once it is refit, the same step again
                if not self._wait(lambda: self.refits > refits):
                    return
                continue
            step += 1

    def get(self, step: int, poll_s: float = 5.0) -> StepBatch:
        """The batch of `step` (waits while the thread is alive; its error is raised here)."""
        while True:
            try:
                got, item = self.results.get(timeout=poll_s)
                break
            except queue.Empty:
                if not self.thread.is_alive():
                    raise RuntimeError("the rollout producer stopped without a batch for step "
                                       f"{step}") from None
        if isinstance(item, BaseException):
            raise item
        if got != step:
            raise RuntimeError(f"the rollout producer sent step {got} where step {step} was expected")
        return item

    def trained_through(self, step: int) -> None:
        with self.cond:
            self.trained = step
            self.cond.notify_all()

    def refit_done(self) -> None:
        with self.cond:
            self.refits += 1
            self.cond.notify_all()

    def cursor_before(self, step: int) -> dict:
        """The rows cursor before `step`'s batch was taken (now, if it was not taken yet)."""
        with self.cond:
            return self.cursors.get(step) or self.rollouts.rows.state()

    def busy_within(self, start: float, end: float) -> list[tuple[float, float]]:
        """The generation intervals (clipped) that fall inside [start, end]."""
        spans = list(self.busy)
        since = self.generating_since
        if since is not None:
            spans.append((since, end))
        return [(max(a, start), min(b, end)) for a, b in spans if b > start and a < end]

    def stop(self, timeout_s: float = 900.0) -> None:
        """Let a batch in flight finish (rollouts have their own timeouts), then end the thread."""
        with self.cond:
            self.stopping = True
            self.cond.notify_all()
        self.thread.join(timeout_s)


def overlap_s(first: list[tuple[float, float]], second: list[tuple[float, float]]) -> float:
    """Seconds during which an interval of `first` and one of `second` both ran."""
    return sum(max(0.0, min(b1, b2) - max(a1, a2)) for a1, b1 in first for a2, b2 in second)


def bound_staleness(batch: StepBatch, version: int, max_staleness: int) -> StepBatch:
    """Drop the groups with a token sampled more than `max_staleness` versions before `version` (the
    weights this step trains from) and add the step's staleness metrics. A sample without per-token
    versions (NeMo Gym's model server in between) counts as sampled at its batch's start version."""
    start = batch.metrics.get("batch_start_version", version)
    oldest = {}
    for s in batch.samples:
        v = s.oldest_version
        v = start if v is None else v
        oldest[s.group_id] = min(oldest.get(s.group_id, v), v)
    stale = {g for g, v in oldest.items() if version - v > max_staleness}
    keep = [i for i, s in enumerate(batch.samples) if s.group_id not in stale]
    samples = [batch.samples[i] for i in keep]
    versions = [v for s in samples for v in (s.generated_versions or [start] * s.num_generated)]
    lags = [version - v for v in versions]
    metrics = {**batch.metrics, "weight_version": version, "token_version_min": min(versions, default=version),
               "token_version_max": max(versions, default=version),
               "staleness_mean": sum(lags) / max(len(lags), 1), "staleness_max": max(lags, default=0),
               "partial_rollout_frac": sum(s.num_versions > 1 for s in samples) / max(len(samples), 1),
               "dropped_stale_frac": len(stale) / max(len(oldest), 1)}
    return StepBatch(samples, [batch.advantages[i] for i in keep], metrics, batch.refit_needed)
