"""`Env`: one environment as rollouts see it (its URL, config, dataset rows), wherever its server runs.

Its own module so that the spin-up code (spinup.py, nemo_gym.py) and the rollout code can all import it
without importing each other.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from sglgym.procs import ServerProcess

from .config import EnvConfig


@dataclass
class Env:
    """A running (or external) environment: its URL, config, and dataset rows."""
    config: EnvConfig
    url: str
    server: ServerProcess | None = None
    engine_urls: list[str] = field(default_factory=list)   # nemo_gym envs: the engines their model server calls
    _impl: object = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.config.name

    @property
    def tools(self) -> list[dict]:
        impl = self.impl
        return [spec for spec, _ in impl.tools().values()] if impl else []

    @property
    def impl(self):
        """The env class instance in this process (built-in envs): dataset generation and tool specs."""
        if self._impl is None and self.config.type == "resources_server" and self.config.entrypoint:
            from .envs.base import load_env_class
            self._impl = load_env_class(self.config.entrypoint)(**self.config.params)
        return self._impl

    def dataset(self, n: int, seed: int | None = None, split: str = "train") -> list[dict]:
        """n NeMo Gym rows for this env: from the configured JSONL (cycled; `<split>_jsonl`, e.g. test_jsonl,
        when the config names one for this split) or the seeded generator."""
        ds = self.config.dataset
        seed = ds.get("seed", 0) if seed is None else seed
        jsonl = ds.get(f"{split}_jsonl") or ds.get("jsonl")
        if jsonl:
            rows = [json.loads(line) for line in Path(jsonl).read_text().splitlines() if line.strip()]
            if not rows:
                raise ValueError(f"{jsonl}: no rows")
            out = [dict(rows[i % len(rows)]) for i in range(n)]
        elif self.impl is not None:
            out = self.impl.dataset(n, seed=seed, split=split)
        else:
            raise ValueError(f"env {self.name!r} has no dataset: set dataset.jsonl in its config")
        for row in out:  # rows name the env that runs them (NeMo Gym's agent_ref): this env
            row["agent_ref"] = {"type": "responses_api_agents", "name": self.name}
        return out

    def write_dataset(self, path: str | os.PathLike, n: int, seed: int | None = None,
                      split: str = "train") -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.dataset(n, seed, split)))
        return path
