"""Refit every engine replica from the trainer's weights, and probe that each one agrees.

Every rank calls `refit` (gathering sharded weights is a collective); rank 0 pushes the full weights in
Hugging Face names to each engine in `engines`, by the configured path (tensor | disk | distributed: one
weight-update group with every replica, each bucket broadcast once), and reports seconds and GB/s.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path

from .hf_files import save_hf_weights
from .policy import HFPolicy
from .ranks import Ranks
from .refit import DistributedRefit, EngineControl, RefitError, probe, refit_from_tensor


class Refitter:
    def __init__(self, path: str, policy: HFPolicy, ranks: Ranks, engines: list[EngineControl], out_dir: Path):
        if path not in ("tensor", "disk", "distributed"):
            raise ValueError(f"refit must be tensor, disk or distributed; got {path!r}")
        self.path, self.policy, self.ranks, self.engines, self.out_dir = path, policy, ranks, engines, out_dir
        self.group: DistributedRefit | None = None     # rank 0, path distributed: trainer + every engine
        self.version = 0
        self.recover: Callable[[], bool] | None = None   # rank 0: restarts a dead engine (trainer/recovery.py)
        self._last: tuple | None = None                  # rank 0: what the last refit pushed, for a restarted engine

    def _with_recovery(self, engine: EngineControl | None, push: Callable[[], object]):
        """Run `push` (for one engine, or None: all of them); if an engine fails and `recover` restarts it,
        run it once more with the new engine process."""
        try:
            return push()
        except RefitError as e:
            if self.recover is None or not self.recover():
                raise
            print(f"[train] {e}: engine restarted, retrying", flush=True)
            self._drop_group()   # the new engine process is in no group: a new one with every engine
            for control in [engine] if engine is not None else self.engines:
                control.close()
            if self._last is not None:  # it starts from the base weights: give it the current ones first
                self._push(engine, *self._last)
            return push()

    def _drop_group(self) -> None:
        if self.group is not None:
            with suppress(Exception):   # a member is gone: what is left of the group is torn down
                self.group.close()
            self.group = None

    def refit(self, version: int | None = None) -> dict[str, float]:
        """Push the current weights into every engine as weight version `step-<version>` (default: the
        next one); {} on ranks other than 0."""
        named = self.policy.named_tensors()  # every rank: a collective under FSDP
        self.version = self.version + 1 if version is None else version
        if not self.ranks.main:
            return {}
        version = f"step-{self.version}"
        t0 = time.perf_counter()
        weights_dir = None
        if self.path == "disk":
            weights_dir = save_hf_weights(named, self.policy.model_path, self.out_dir / "refit-weights")
        self._last = None
        if self.path == "distributed":   # one broadcast reaches every engine
            self._with_recovery(None, lambda: self._push(None, named, version, weights_dir))
        else:
            for engine in self.engines:
                self._with_recovery(engine, lambda: self._push(engine, named, version, weights_dir))
        self._last = (named, version, weights_dir)
        seconds = time.perf_counter() - t0
        gb = sum(t.numel() * t.element_size() for _, t in named) / 1e9
        return {"refit_s": seconds, "refit_gb": gb * len(self.engines), "refit_gb_per_s": gb * len(self.engines) / max(seconds, 1e-9)}

    def _push(self, engine: EngineControl | None, named: list, version: str, weights_dir: Path | None) -> None:
        """Into `engine`; the distributed path always pushes into every engine (one group)."""
        if self.path == "distributed":
            if self.group is None:
                self.group = DistributedRefit(self.engines, group_name=f"sglgym_refit_{id(self):x}_{self.version}")
            self.group.update(named, version)
        elif self.path == "disk":
            with engine.paused():
                engine.post("/update_weights_from_disk", {"model_path": str(weights_dir), "weight_version": version})
        else:
            refit_from_tensor(engine, named, version)

    def check_agreement(self, sequences: list[list[int]] | None, atol: float = 1e-4) -> dict:
        """Every rank calls it (the trainer's scoring is a collective under FSDP); rank 0 compares the
        trainer's logprobs with each engine's, at temperature 1 (SGLang's prefill logprobs are unscaled)."""
        sequences = self.ranks.broadcast(sequences[:4] if sequences is not None else None)
        trainer_lps = self.policy.score(sequences, 1.0)
        if not self.ranks.main:
            return {}
        worst, ok = 0.0, True
        for engine in self.engines:
            result = self._with_recovery(engine, lambda: probe(engine, lambda _seqs: trainer_lps, sequences, atol=atol))
            print(f"[train] {engine.base_url}: {result}", flush=True)
            worst, ok = max(worst, result.max_abs_diff), ok and result.ok
        if not ok:
            print("[train] WARNING: engine and trainer logprobs diverge after refit: the engine is not "
                  "sampling from the weights being trained", flush=True)
        return {"probe_max_abs_diff": worst, "probe_ok": ok}

    def close(self) -> None:
        if self.group is not None:
            self.group.close()
            self.group = None
