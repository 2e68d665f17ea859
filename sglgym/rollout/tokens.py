"""Exact token tracking over the turns of one rollout.

The engine returns, for every turn, the prompt ids it saw and the ids it sampled. The next turn's prompt
must start with all of them (the on-policy fix on the server guarantees it when the ids are carried
back on the assistant message). If it does not, the sequence a trainer would score is not the one the
policy produced, so we stop with a diff that shows where the two diverge.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from .samples import Sample


class ContiguityError(AssertionError):
    """A turn's prompt does not start with everything the rollout has seen so far."""


def contiguity_diff(seen: Sequence[int], prompt: Sequence[int], turn: int,
                    decode: Callable[[list[int]], str] | None = None, context: int = 8) -> str:
    """Readable description of where `prompt` stops extending `seen`."""
    pos = next((i for i, (a, b) in enumerate(zip(seen, prompt)) if a != b), min(len(seen), len(prompt)))
    lo = max(0, pos - context)
    lines = [
        f"turn {turn}: prompt_token_ids ({len(prompt)} ids) do not start with the {len(seen)} ids seen so far; "
        f"first difference at position {pos}",
        f"  seen   [{lo}:{pos + context}] = {list(seen[lo:pos + context])}",
        f"  prompt [{lo}:{pos + context}] = {list(prompt[lo:pos + context])}",
    ]
    if decode is not None:
        lines.append(f"  seen   text: {decode(list(seen[lo:pos + context]))!r}")
        lines.append(f"  prompt text: {decode(list(prompt[lo:pos + context]))!r}")
    if len(prompt) < len(seen) and pos == len(prompt):
        lines.append("  (the prompt is a strict prefix of what was seen: history was dropped)")
    return "\n".join(lines)


class TokenTracker:
    """Accumulates one rollout's ids turn by turn into a packed sequence with a loss mask."""

    def __init__(self, decode: Callable[[list[int]], str] | None = None, split_on_break: bool = False):
        """`split_on_break`: a turn whose prompt does not extend what was seen starts a new segment (the
        sample's `segment_starts`) instead of failing the rollout."""
        self.decode, self.split_on_break = decode, split_on_break
        self.token_ids: list[int] = []
        self.loss_mask: list[int] = []
        self.logprobs: list[float] = []
        self.versions: list[int] = []      # weight version per token (-1 where the policy did not generate)
        self.versions_known = True         # False once a turn came without them (NeMo Gym's model server)
        self.spans: list[tuple[int, int]] = []
        self.segment_starts: list[int] = []

    @property
    def num_turns(self) -> int:
        return len(self.spans)

    def add_turn(self, prompt_ids: Sequence[int], gen_ids: Sequence[int], gen_logprobs: Sequence[float],
                 gen_versions: Sequence[int] | None = None) -> None:
        start = self.segment_starts[-1] if self.segment_starts else 0
        seen = self.token_ids[start:]      # the current segment: what this turn's prompt must extend
        if len(gen_logprobs) != len(gen_ids):
            raise ContiguityError(f"turn {self.num_turns}: {len(gen_ids)} generated ids but "
                                  f"{len(gen_logprobs)} logprobs")
        if list(prompt_ids[:len(seen)]) != seen:
            if not self.split_on_break:
                raise ContiguityError(contiguity_diff(seen, prompt_ids, self.num_turns, self.decode))
            self.segment_starts.append(len(self.token_ids))
            seen = []
        new_prompt = list(prompt_ids[len(seen):])  # template tail: environment/tool/user text (not trained on)
        self.token_ids += new_prompt
        self.loss_mask += [0] * len(new_prompt)
        self.logprobs += [0.0] * len(new_prompt)
        self.versions += [-1] * len(new_prompt)
        start = len(self.token_ids)
        self.token_ids += list(gen_ids)
        self.loss_mask += [1] * len(gen_ids)
        self.logprobs += [float(x) for x in gen_logprobs]
        self.versions += list(gen_versions) if gen_versions is not None else [0] * len(gen_ids)
        self.versions_known = self.versions_known and gen_versions is not None
        self.spans.append((start, len(self.token_ids)))

    def to_sample(self, **fields) -> Sample:
        return Sample(token_ids=list(self.token_ids), loss_mask=list(self.loss_mask),
                      gen_logprobs=list(self.logprobs), turn_spans=list(self.spans),
                      num_turns=self.num_turns, segment_starts=list(self.segment_starts),
                      gen_versions=list(self.versions) if self.versions_known else [], **fields)
