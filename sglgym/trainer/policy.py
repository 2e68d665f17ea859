"""Reference trainer for Hugging Face causal LMs (backend `hf`: one process, CPU or GPU): optimizer, grad
clipping, GRPO loss. `FSDPPolicy` (fsdp.py) shards the same thing over ranks.

The loss is `sglgym.kernels.grpo_loss` (Triton on CUDA, chunked torch on CPU), fed the packed rows of
each micro-batch; gradients accumulate over micro-batches with the step's denominators (`StepTotals`,
over every rank), so the step equals the loss over the whole batch however it is split.
On CUDA the forward runs in bf16 (autocast) over fp32 weights and the loss in fp32; on CPU all fp32.
Every micro-batch is moved to the model's device here, never by the caller.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from sglgym.kernels import GRPOLossConfig, grpo_loss, token_logprobs

from .batches import MicroBatch, null_micro_batch
from .hf_files import load_hf_weights, save_hf_weights
from .ranks import Ranks
from .totals import step_loss_config, step_totals


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0


def _merge_metrics(sums: dict[str, float], metrics: dict, weight: float) -> None:
    for k, v in metrics.items():
        v = float(v)
        if k == "ratio_min":
            sums[k] = min(sums.get(k, v), v)
        elif k == "ratio_max":
            sums[k] = max(sums.get(k, v), v)
        elif k != "num_tokens":  # the step's total is returned by the caller
            sums[k] = sums.get(k, 0.0) + v * weight  # token-weighted average over the step


class HFPolicy:
    def __init__(self, model_path: str, optim: OptimConfig = OptimConfig(), device: str | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0, ranks: Ranks | None = None,
                 activation_checkpointing: bool = False):
        torch.manual_seed(seed)
        self.ranks = ranks or Ranks()
        self.model_path, self.dtype = model_path, dtype
        self.device = device or self.ranks.device()
        self.activation_checkpointing = activation_checkpointing
        self.model = self.build_model()
        self.model.train()
        self.optim_cfg = optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.reference: torch.nn.Module | None = None  # frozen policy for a KL term (freeze_reference)

    # --- model ------------------------------------------------------------------------------------
    def load_model(self) -> torch.nn.Module:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(self.model_path, dtype=self.dtype)
        if self.activation_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return model

    def build_model(self) -> torch.nn.Module:
        return self.load_model().to(self.device)

    @property
    def grad_scale(self) -> float:
        """Factor on each micro-batch loss before backward (FSDP averages gradients over ranks)."""
        return 1.0

    def autocast(self):
        if str(self.device).startswith("cuda"):
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    # --- forward ------------------------------------------------------------------------------
    def packed_logits(self, mb: MicroBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        with self.autocast():
            out = (model or self.model)(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        return mb.packed_logits(out.logits.float())

    @torch.no_grad()
    def logprobs(self, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
        """[T] logprob of every target row under the current weights (old logprob recompute), on the
        model's device."""
        mb = mb.to(self.device)
        was_training = self.model.training
        self.model.eval()
        try:
            return token_logprobs(self.packed_logits(mb), mb.target_ids, temperature)
        finally:
            self.model.train(was_training)

    def freeze_reference(self) -> None:
        """Keep a frozen copy of the current weights as the KL reference policy."""
        import copy

        self.reference = copy.deepcopy(self.model).eval().requires_grad_(False)

    @torch.no_grad()
    def ref_logprobs(self, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
        """[T] logprob of every target row under the frozen reference policy, on the model's device."""
        if self.reference is None:
            raise RuntimeError("no reference policy: call freeze_reference() first")
        mb = mb.to(self.device)
        return token_logprobs(self.packed_logits(mb, self.reference), mb.target_ids, temperature)

    def score(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Logprob of every token after the first (what the refit probe compares with the engine).
        With several ranks every rank must call it with the same sequences."""
        from sglgym.rollout.samples import Sample
        from .batches import make_micro_batch

        samples = [Sample(token_ids=s, loss_mask=[0] * len(s), gen_logprobs=[0.0] * len(s), turn_spans=[],
                          reward=0.0, group_id=0, prompt_index=0, truncated=False, num_turns=0, env="",
                          engine_url="") for s in sequences]
        mb = make_micro_batch(samples, [0.0] * len(samples), range(len(samples)))
        lps = self.logprobs(mb, temperature).double().cpu()
        cu = mb.cu_seqlens.tolist()
        return [lps[cu[i]:cu[i + 1]].tolist() for i in range(len(sequences))]

    def even_out(self, micro_batches: list[MicroBatch]) -> list[MicroBatch]:
        """Pad this rank's micro-batches with empty ones up to the most any rank has: a sharded forward
        is a collective, so every rank must run as many."""
        most = int(self.ranks.all_reduce([len(micro_batches)], "max")[0])
        return micro_batches + [null_micro_batch() for _ in range(most - len(micro_batches))]

    # --- steps --------------------------------------------------------------------------------
    def clip_and_step(self) -> float:
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        if hasattr(grad_norm, "full_tensor"):  # a DTensor under FSDP2: the norm over every shard
            grad_norm = grad_norm.full_tensor()
        self.optimizer.step()
        return float(grad_norm)

    def grpo_step(self, micro_batches: Sequence[MicroBatch], loss_cfg: GRPOLossConfig) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (every rank calls it with its own share);
        returns the step's metrics over every rank."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = self.even_out(list(micro_batches))
        totals = step_totals(micro_batches, self.ranks.group)
        cfg = step_loss_config(loss_cfg, totals)
        sums: dict[str, float] = {}
        loss_total = 0.0
        for mb in micro_batches:
            mb = mb.to(self.device)
            loss, metrics = grpo_loss(
                self.packed_logits(mb), mb.target_ids, mb.old_logprobs, mb.advantages, mb.loss_mask, mb.cu_seqlens,
                cfg, ref_logprobs=mb.ref_logprobs, gen_logprobs=mb.gen_logprobs,
                global_num_tokens=max(totals.num_tokens, 1), global_num_seqs=max(totals.num_seqs, 1),
            )
            (loss * self.grad_scale).backward()
            loss_total += float(loss.detach())
            if mb.num_loss_tokens:
                _merge_metrics(sums, metrics, mb.num_loss_tokens / max(totals.num_tokens, 1))
        grad_norm = self.clip_and_step()
        return {"grad_norm": grad_norm, "num_tokens": float(totals.num_tokens), **self._reduce(loss_total, sums)}

    def _reduce(self, loss_total: float, sums: dict[str, float]) -> dict[str, float]:
        """The step's loss and token-weighted metrics over every rank (min/max reduce as such)."""
        keys = sorted(k for k in sums if k not in ("ratio_min", "ratio_max"))
        added = self.ranks.all_reduce([loss_total] + [sums[k] for k in keys], "sum")
        out = {"loss": added[0], **dict(zip(keys, added[1:]))}
        for k, op in (("ratio_min", "min"), ("ratio_max", "max")):
            if self.ranks.world_size > 1:  # a rank without loss tokens offers the neutral element
                mine = sums.get(k, float("inf") if op == "min" else float("-inf"))
                out[k] = self.ranks.all_reduce([mine], op)[0]
            elif k in sums:
                out[k] = sums[k]
        return out

    def sft_step(self, micro_batches: Sequence[MicroBatch]) -> float:
        """Supervised step: mean negative logprob of the loss-masked tokens (warm-up before GRPO)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        micro_batches = self.even_out(list(micro_batches))
        total_tokens = max(step_totals(micro_batches, self.ranks.group).num_tokens, 1)
        loss_total = 0.0
        for mb in micro_batches:
            mb = mb.to(self.device)
            logp = token_logprobs(self.packed_logits(mb), mb.target_ids)
            loss = -(logp * mb.loss_mask).sum() / total_tokens
            (loss * self.grad_scale).backward()
            loss_total += float(loss.detach())
        self.clip_and_step()
        return self.ranks.all_reduce([loss_total], "sum")[0]

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Weights in Hugging Face names, as the engine loads them. (Every rank calls it; under FSDP only
        rank 0 gets the tensors.)"""
        return [(n, t.detach()) for n, t in self.model.state_dict().items()]

    # --- checkpoints --------------------------------------------------------------------------
    def save_state(self, directory: Path) -> None:
        """Weights as a Hugging Face model (`model/`, loadable by from_pretrained and the engine), the
        optimizer, and the KL reference when there is one."""
        save_hf_weights(self.named_tensors(), self.model_path, directory / "model")
        torch.save(self.optimizer.state_dict(), directory / "optimizer.pt")
        if self.reference is not None:
            save_hf_weights(list(self.reference.state_dict().items()), self.model_path, directory / "reference")

    def load_state(self, directory: Path) -> None:
        """Exactly the weights and optimizer state `save_state` wrote (call freeze_reference first if the
        run has a KL reference)."""
        with torch.no_grad():
            self.model.load_state_dict(load_hf_weights(directory / "model"), strict=True)
        self.optimizer.load_state_dict(torch.load(directory / "optimizer.pt", weights_only=True))
        if self.reference is not None:
            with torch.no_grad():
                self.reference.load_state_dict(load_hf_weights(directory / "reference"), strict=True)
