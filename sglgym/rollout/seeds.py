"""Per-sample sampling seeds: one helper for every caller (agent loop, bench, tests).

A batch with `seed` set gives each (prompt, sample, turn) its own seed. The three indices are packed into
disjoint bit fields, so two different triples never get the same seed (the old `1000 * prompt + 100 *
sample + turn` collided once a group had more than 10 samples); adding the base modulo 2**63 keeps that.
"""

from __future__ import annotations

TURN_BITS, SAMPLE_BITS, PROMPT_BITS = 8, 16, 38
_MASK63 = (1 << 63) - 1


def rollout_seed(base: int, prompt_index: int, sample_index: int, turn: int) -> int:
    """A seed in [0, 2**63) that is distinct for every (prompt_index, sample_index, turn) with the same base."""
    for name, value, bits in (("prompt_index", prompt_index, PROMPT_BITS), ("sample_index", sample_index, SAMPLE_BITS),
                              ("turn", turn, TURN_BITS)):
        if not 0 <= value < (1 << bits):
            raise ValueError(f"{name}={value} is outside [0, 2**{bits}) for per-sample seeds")
    packed = (prompt_index << (SAMPLE_BITS + TURN_BITS)) | (sample_index << TURN_BITS) | turn
    return (int(base) + packed) & _MASK63


def unpack_rollout_seed(seed: int, base: int) -> tuple[int, int, int]:
    """(prompt_index, sample_index, turn) of a seed made by `rollout_seed(base, ...)` (scripted test engines
    use it to tell which sample is asking)."""
    packed = (int(seed) - int(base)) & _MASK63
    return (packed >> (SAMPLE_BITS + TURN_BITS), (packed >> TURN_BITS) & ((1 << SAMPLE_BITS) - 1),
            packed & ((1 << TURN_BITS) - 1))
