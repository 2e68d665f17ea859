"""Checkpoints of a run, in `OUT/checkpoints/step-N/`: what a crashed run needs to continue.

Each holds the policy's state (`policy.save_state`: Hugging Face safetensors + optimizer for `hf`,
torch.distributed.checkpoint shards for `fsdp`), every rank's RNG states (torch, CUDA, Python, numpy),
and `trainer_state.json` (step, weight version, the data cursor, the evaluation before GRPO, the config).
A checkpoint is written into `.tmp-step-N/` and renamed when every rank has finished: a directory named
`step-N` is always complete, and a crash mid-save leaves only a temporary that the next save removes.
The learning rate is constant (no schedule), so there is no scheduler state to keep.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path

import numpy as np
import torch

from .ranks import Ranks

STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_dirs(out_dir: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first."""
    root = Path(out_dir) / "checkpoints"
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if p.is_dir() and (m := STEP_DIR.match(p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    dirs = checkpoint_dirs(out_dir)
    return dirs[-1] if dirs else None


def read_trainer_state(checkpoint: Path) -> dict:
    return json.loads((checkpoint / "trainer_state.json").read_text())


def rng_state() -> dict:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    def __init__(self, out_dir: Path, ranks: Ranks, keep_last: int = 2):
        self.root, self.ranks, self.keep_last = Path(out_dir) / "checkpoints", ranks, keep_last

    def save(self, step: int, policy, trainer_state: dict) -> Path:
        """Every rank calls it (sharded state is a collective). Returns the checkpoint's directory."""
        final, tmp = self.root / f"step-{step}", self.root / f".tmp-step-{step}"
        if self.ranks.main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
        self.ranks.barrier()
        policy.save_state(tmp)
        torch.save(rng_state(), tmp / f"rng-rank{self.ranks.rank}.pt")
        if self.ranks.main:
            (tmp / "trainer_state.json").write_text(json.dumps({"step": step, **trainer_state}, indent=1))
        self.ranks.barrier()  # every rank's files are written before the rename makes it complete
        if self.ranks.main:
            _fsync_dir(tmp)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            _fsync_dir(self.root)
            self._prune()
        self.ranks.barrier()
        return final

    def _prune(self) -> None:
        for old in checkpoint_dirs(self.root.parent)[:-self.keep_last]:
            shutil.rmtree(old, ignore_errors=True)
        for tmp in self.root.glob(".tmp-step-*"):  # left by a crash mid-save
            shutil.rmtree(tmp, ignore_errors=True)

    def load(self, checkpoint: Path, policy) -> dict:
        """Every rank: the policy's state and this rank's RNG; returns trainer_state.json."""
        policy.load_state(checkpoint)
        rng_file = checkpoint / f"rng-rank{self.ranks.rank}.pt"
        if rng_file.exists():  # absent when resuming on more ranks than saved: those keep their seed
            set_rng_state(torch.load(rng_file, weights_only=False))
        return read_trainer_state(checkpoint)
