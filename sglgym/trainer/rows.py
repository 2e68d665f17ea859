"""Where training rows come from: one or several environments mixed by weight, and rows handed back.

Fresh rows follow the weights exactly over time (smooth weighted round-robin: with {a: 0.5, b: 0.3,
c: 0.2} every 10 rows hold 5, 3 and 2). Rows the collector did not decide on (cut short or never launched
when the batch filled) are handed back with `requeue` and come out first next time, so dynamic sampling
does not lose the prompts whose rollouts are slow.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator

from sglgym.rollout.spinup import Env


class RowSource:
    def __init__(self, envs: dict[str, Env], weights: dict[str, float], seed: int = 0, split: str = "train",
                 chunk: int = 4096):
        missing = sorted(set(weights) - set(envs))
        if missing:
            raise KeyError(f"no running env named {missing} (running: {sorted(envs)})")
        self.envs, self.weights, self.split, self.chunk = envs, dict(weights), split, chunk
        self._credit = {name: 0.0 for name in weights}
        self._rows: dict[str, Iterator[dict]] = {name: iter(()) for name in weights}
        self._seed = {name: seed for name in weights}   # seed of each env's next chunk
        self._taken: dict[str, int | None] = {name: None for name in weights}  # rows used of the current chunk
        self._requeued: deque[dict] = deque()

    def _next_env(self) -> str:
        for name, weight in self.weights.items():
            self._credit[name] += weight
        name = max(self._credit, key=self._credit.__getitem__)
        self._credit[name] -= sum(self.weights.values())
        return name

    def _fresh_row(self, name: str) -> dict:
        while True:
            try:
                row = next(self._rows[name])
                self._taken[name] += 1
                return row
            except StopIteration:  # the next seeded chunk of this env's rows
                self._rows[name] = iter(self.envs[name].dataset(self.chunk, seed=self._seed[name], split=self.split))
                self._seed[name] += 1
                self._taken[name] = 0

    def take(self, n: int) -> list[dict]:
        """n rows: requeued ones first (in the order they were handed back), then fresh ones by weight."""
        out = []
        while self._requeued and len(out) < n:
            out.append(self._requeued.popleft())
        while len(out) < n:
            out.append(self._fresh_row(self._next_env()))
        return out

    def requeue(self, rows: list[dict]) -> None:
        self._requeued.extendleft(reversed(rows))

    def state(self) -> dict:
        """The cursor (JSON): which rows of which env come next, the requeued rows included."""
        return {"credit": dict(self._credit), "seed": dict(self._seed), "taken": dict(self._taken),
                "requeued": list(self._requeued)}

    def load_state(self, state: dict) -> None:
        """Continue exactly where `state()` was taken: the same rows come out next."""
        self._credit = {name: float(state["credit"][name]) for name in self.weights}
        self._seed = {name: int(state["seed"][name]) for name in self.weights}
        self._taken = {name: state["taken"][name] for name in self.weights}
        self._requeued = deque(state["requeued"])
        for name, taken in self._taken.items():
            if taken is None:
                self._rows[name] = iter(())
            else:  # rebuild the current chunk (same seed) and skip the rows already used
                chunk = self.envs[name].dataset(self.chunk, seed=self._seed[name] - 1, split=self.split)
                self._rows[name] = iter(chunk[taken:])

    @property
    def pending(self) -> int:
        return len(self._requeued)
