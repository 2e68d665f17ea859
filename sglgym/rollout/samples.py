"""The training sample: one packed token sequence per rollout, plus JSONL (de)serialisation.

A multi-turn rollout is stored as the single sequence the engine saw at its last turn followed by that
turn's generation. Every turn's prompt starts with everything before it (checked by `TokenTracker`), so
this one sequence holds every prompt and every generation exactly once, with the ids the engine used.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Iterable


@dataclass
class Sample:
    token_ids: list[int]                 # prompt + generations + environment replies, in order
    loss_mask: list[int]                 # 1 on tokens the policy generated, 0 elsewhere
    gen_logprobs: list[float]            # sampling logprob of each generated token, 0.0 where mask is 0
    turn_spans: list[tuple[int, int]]    # [start, end) of each turn's generation in token_ids
    reward: float
    group_id: int                        # samples of the same prompt share it (GRPO group)
    prompt_index: int                    # index of the dataset row the group was sampled from
    truncated: bool                      # stopped by max_tokens, context length or max turns
    num_turns: int
    env: str
    engine_url: str
    meta: dict = field(default_factory=dict)
    # where a new, independent sequence starts: a turn whose prompt dropped what came before (a template
    # that rewrites history) splits the rollout there; the trainer scores each segment on its own
    segment_starts: list[int] = field(default_factory=list)
    # the weight version that sampled each token (-1 where loss_mask is 0); [] when the engine did not say
    # (a NeMo Gym model server in between). Asynchronous training bounds staleness with it.
    gen_versions: list[int] = field(default_factory=list)

    @property
    def generated_versions(self) -> list[int]:
        """The weight version of each generated token ([] when unknown)."""
        return [v for v, m in zip(self.gen_versions, self.loss_mask) if m]

    @property
    def oldest_version(self) -> int | None:
        return min(self.generated_versions, default=None)

    @property
    def num_versions(self) -> int:
        return len(set(self.generated_versions))

    @property
    def num_generated(self) -> int:
        return sum(self.loss_mask)

    @property
    def prompt_len(self) -> int:
        """Tokens before the first generated token (the dataset prompt as the engine saw it)."""
        return self.turn_spans[0][0] if self.turn_spans else len(self.token_ids)

    def validate(self) -> None:
        """Raise ValueError if the packed fields disagree with each other."""
        n = len(self.token_ids)
        if len(self.loss_mask) != n or len(self.gen_logprobs) != n:
            raise ValueError(f"length mismatch: token_ids {n}, loss_mask {len(self.loss_mask)}, "
                             f"gen_logprobs {len(self.gen_logprobs)}")
        expected = [0] * n
        last_end = 0
        for start, end in self.turn_spans:
            if not (last_end <= start <= end <= n):
                raise ValueError(f"turn span {(start, end)} out of order or out of range (length {n})")
            expected[start:end] = [1] * (end - start)
            last_end = end
        if expected != list(self.loss_mask):
            raise ValueError("loss_mask is not 1 exactly on the turn spans")
        bad = [i for i, (m, lp) in enumerate(zip(self.loss_mask, self.gen_logprobs)) if m == 0 and lp != 0.0]
        if bad:
            raise ValueError(f"gen_logprobs must be 0.0 where loss_mask is 0 (first at {bad[0]})")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["turn_spans"] = [list(s) for s in self.turn_spans]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Sample":
        d = dict(d)
        d["turn_spans"] = [tuple(s) for s in d.get("turn_spans", [])]
        d.setdefault("meta", {})
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, line: str) -> "Sample":
        return cls.from_dict(json.loads(line))


def write_jsonl(samples: Iterable[Sample], path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        for s in samples:
            f.write(s.to_json() + "\n")
    return path


def read_jsonl(path: str | os.PathLike) -> list[Sample]:
    """Read samples back; lines that are not samples (failure records of a rollout log) are skipped."""
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            d = json.loads(line)
            if "token_ids" in d:
                out.append(Sample.from_dict(d))
    return out


class JsonlSink:
    """Appends records as they arrive and flushes each line, so a crash loses nothing already finished."""

    def __init__(self, path: str | os.PathLike | None):
        self.path = Path(path) if path else None
        self._f: IO | None = None
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a")

    def write(self, record: dict) -> None:
        if self._f:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            self._f.flush()

    def close(self) -> None:
        if self._f:
            self._f.close()
            self._f = None
