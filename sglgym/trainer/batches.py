"""Rollout samples -> micro-batches for the trainer.

Each sample is one sequence (every prompt and generation of the rollout, exactly as the engine saw it).
A micro-batch holds the sequences twice over:
- model input: padded `[B, L]` ids + attention mask (what HF models take), and the packed THD form
  (`packed_input_ids` [sum L_i], `position_ids` restarting at 0 per sequence, `input_cu_seqlens`) that
  Megatron-style packed attention takes;
- loss side, packed over the *predicted* tokens: row t of the packed logits predicts `target_ids[t]`
  (sequence i contributes L_i - 1 rows), with `loss_mask`, `gen_logprobs`, `advantages`, optional
  `old_logprobs` / `ref_logprobs`, and `cu_seqlens` [B+1] over those rows — the layout `sglgym.kernels`
  takes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from sglgym.rollout.samples import Sample


@dataclass
class MicroBatch:
    input_ids: Tensor          # [B, L] int64, right-padded with pad_id
    attention_mask: Tensor     # [B, L] int64
    lengths: list[int]         # L_i
    target_ids: Tensor         # [T] int64, T = sum(L_i - 1)
    loss_mask: Tensor          # [T] float32: 1 on generated tokens
    gen_logprobs: Tensor       # [T] float32: the engine's sampling logprobs (0 off the mask)
    advantages: Tensor         # [T] float32
    cu_seqlens: Tensor         # [B+1] int32 over the T loss rows
    sample_index: list[int]    # positions of these samples in the step's batch
    old_logprobs: Tensor | None = None   # [T] policy logprobs before this step's updates
    ref_logprobs: Tensor | None = None   # [T] reference policy logprobs (KL)

    @property
    def num_loss_tokens(self) -> int:
        return int(self.loss_mask.sum().item())

    @property
    def num_seqs(self) -> int:
        return len(self.lengths)

    def packed_logits(self, logits: Tensor) -> Tensor:
        """[B, L, V] logits of the padded input -> [T, V] rows that predict `target_ids`."""
        return torch.cat([logits[i, : n - 1] for i, n in enumerate(self.lengths)], dim=0)

    @property
    def packed_input_ids(self) -> Tensor:
        return torch.cat([self.input_ids[i, :n] for i, n in enumerate(self.lengths)])

    @property
    def position_ids(self) -> Tensor:
        return torch.cat([torch.arange(n) for n in self.lengths])

    @property
    def input_cu_seqlens(self) -> Tensor:
        return torch.tensor([0, *torch.tensor(self.lengths).cumsum(0).tolist()], dtype=torch.int32)

    def to(self, device: str | torch.device) -> "MicroBatch":
        moved = {k: (v.to(device) if isinstance(v, Tensor) else v) for k, v in self.__dict__.items()}
        return MicroBatch(**moved)


def make_micro_batch(samples: Sequence[Sample], advantages: Sequence[float], sample_index: Sequence[int],
                     pad_id: int = 0) -> MicroBatch:
    """One micro-batch from samples and their per-sample advantages."""
    if not samples:
        raise ValueError("a micro-batch needs at least one sample")
    lengths = [len(s.token_ids) for s in samples]
    if min(lengths) < 2:
        raise ValueError("every sample needs at least 2 tokens (a prompt and one generated token)")
    width = max(lengths)
    input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(samples), width), dtype=torch.long)
    targets, mask, gen_lps, advs = [], [], [], []
    for i, (s, adv) in enumerate(zip(samples, advantages)):
        n = len(s.token_ids)
        input_ids[i, :n] = torch.tensor(s.token_ids)
        attention_mask[i, :n] = 1
        targets += s.token_ids[1:]
        mask += s.loss_mask[1:]
        gen_lps += s.gen_logprobs[1:]
        advs += [float(adv)] * (n - 1)
    cu = torch.tensor([0, *torch.tensor([n - 1 for n in lengths]).cumsum(0).tolist()], dtype=torch.int32)
    return MicroBatch(
        input_ids=input_ids, attention_mask=attention_mask, lengths=lengths,
        target_ids=torch.tensor(targets, dtype=torch.long), loss_mask=torch.tensor(mask, dtype=torch.float32),
        gen_logprobs=torch.tensor(gen_lps, dtype=torch.float32),
        advantages=torch.tensor(advs, dtype=torch.float32), cu_seqlens=cu, sample_index=list(sample_index),
    )


def segments(sample: Sample) -> list[Sample]:
    """The independent sequences of a sample: itself, or one per segment of a rollout split at a break."""
    if not sample.segment_starts:
        return [sample]
    bounds = [0, *sample.segment_starts, len(sample.token_ids)]
    return [replace(sample, token_ids=sample.token_ids[a:b], loss_mask=sample.loss_mask[a:b],
                    gen_logprobs=sample.gen_logprobs[a:b], segment_starts=[],
                    turn_spans=[(s - a, e - a) for s, e in sample.turn_spans if a <= s < b])
            for a, b in zip(bounds, bounds[1:])]


def make_micro_batches(samples: Sequence[Sample], advantages: Sequence[float], max_tokens: int = 4096,
                       pad_id: int = 0) -> list[MicroBatch]:
    """Split a step's samples into micro-batches of at most `max_tokens` padded tokens (B * L_max).

    Samples are sorted by length first so padding stays small; a sample longer than `max_tokens` gets a
    micro-batch of its own. A rollout split at a break trains as one sequence per segment, each with the
    rollout's advantage.
    """
    if len(samples) != len(advantages):
        raise ValueError(f"{len(samples)} samples but {len(advantages)} advantages")
    if any(s.segment_starts for s in samples):
        pairs = [(seg, adv) for s, adv in zip(samples, advantages) for seg in segments(s)]
        samples, advantages = [p[0] for p in pairs], [p[1] for p in pairs]
    order = sorted(range(len(samples)), key=lambda i: len(samples[i].token_ids))
    batches, current = [], []
    for i in order:
        width = max([len(samples[j].token_ids) for j in current] + [len(samples[i].token_ids)])
        if current and width * (len(current) + 1) > max_tokens:
            batches.append(current)
            current = []
        current.append(i)
    if current:
        batches.append(current)
    return [make_micro_batch([samples[i] for i in idx], [advantages[i] for i in idx], idx, pad_id) for idx in batches]


def split_over_ranks(samples: Sequence[Sample], advantages: Sequence[float],
                     world_size: int) -> list[tuple[list[Sample], list[float]]]:
    """The step's samples split over data-parallel ranks, balanced by tokens (longest first, each to the
    rank with the fewest tokens so far); every rank's share keeps the batch's order."""
    loads, shares = [0] * world_size, [[] for _ in range(world_size)]
    for i in sorted(range(len(samples)), key=lambda i: -len(samples[i].token_ids)):
        r = loads.index(min(loads))
        shares[r].append(i)
        loads[r] += len(samples[i].token_ids)
    return [([samples[i] for i in sorted(idx)], [advantages[i] for i in sorted(idx)]) for idx in shares]


def null_micro_batch() -> MicroBatch:
    """A micro-batch with no loss token: a rank with fewer micro-batches than the others runs it, because a
    sharded model's forward and backward are collectives every rank must join. It adds 0 to the loss."""
    s = Sample(token_ids=[0, 0], loss_mask=[0, 0], gen_logprobs=[0.0, 0.0], turn_spans=[], reward=0.0,
               group_id=-1, prompt_index=-1, truncated=False, num_turns=0, env="", engine_url="")
    return make_micro_batch([s], [0.0], [])
