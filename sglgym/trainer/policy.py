"""Reference trainer for Hugging Face causal LMs (CPU and GPU): optimizer, grad clipping, GRPO loss.

The loss is `sglgym.kernels.grpo_loss` (Triton on CUDA, chunked torch on CPU), fed the packed rows of
each micro-batch; gradients accumulate over micro-batches with batch-wide denominators, so the step
equals the loss over the whole batch however it is split.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from sglgym.kernels import GRPOLossConfig, grpo_loss, token_logprobs

from .batches import MicroBatch


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    grad_clip: float = 1.0


class HFPolicy:
    def __init__(self, model_path: str, optim: OptimConfig = OptimConfig(), device: str | None = None,
                 dtype: torch.dtype = torch.float32, seed: int = 0):
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = AutoModelForCausalLM.from_pretrained(model_path, dtype=dtype).to(self.device)
        self.model.train()
        self.optim_cfg = optim
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=optim.lr, betas=optim.betas,
                                           weight_decay=optim.weight_decay)
        self.steps = 0
        self.reference: torch.nn.Module | None = None  # frozen policy for a KL term (freeze_reference)

    # --- forward ------------------------------------------------------------------------------
    def packed_logits(self, mb: MicroBatch, model: torch.nn.Module | None = None) -> torch.Tensor:
        out = (model or self.model)(input_ids=mb.input_ids, attention_mask=mb.attention_mask, use_cache=False)
        return mb.packed_logits(out.logits.float())

    @torch.no_grad()
    def logprobs(self, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
        """[T] logprob of every target row under the current weights (old logprob recompute)."""
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
        """[T] logprob of every target row under the frozen reference policy."""
        if self.reference is None:
            raise RuntimeError("no reference policy: call freeze_reference() first")
        return token_logprobs(self.packed_logits(mb, self.reference), mb.target_ids, temperature)

    def score(self, sequences: list[list[int]], temperature: float = 1.0) -> list[list[float]]:
        """Logprob of every token after the first (what the refit probe compares with the engine)."""
        from sglgym.rollout.samples import Sample
        from .batches import make_micro_batch

        samples = [Sample(token_ids=s, loss_mask=[0] * len(s), gen_logprobs=[0.0] * len(s), turn_spans=[],
                          reward=0.0, group_id=0, prompt_index=0, truncated=False, num_turns=0, env="",
                          engine_url="") for s in sequences]
        mb = make_micro_batch(samples, [0.0] * len(samples), range(len(samples))).to(self.device)
        lps = self.logprobs(mb, temperature).double().cpu()
        cu = mb.cu_seqlens.tolist()
        return [lps[cu[i]:cu[i + 1]].tolist() for i in range(len(sequences))]

    # --- steps --------------------------------------------------------------------------------
    def grpo_step(self, micro_batches: Sequence[MicroBatch], loss_cfg: GRPOLossConfig) -> dict[str, float]:
        """One optimizer step over all micro-batches; returns averaged metrics."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = float(sum(mb.num_loss_tokens for mb in micro_batches))
        total_seqs = float(sum(mb.num_seqs for mb in micro_batches))
        sums: dict[str, float] = {}
        loss_total = 0.0
        for mb in micro_batches:
            mb = mb.to(self.device)
            loss, metrics = grpo_loss(
                self.packed_logits(mb), mb.target_ids, mb.old_logprobs, mb.advantages, mb.loss_mask, mb.cu_seqlens,
                loss_cfg, ref_logprobs=mb.ref_logprobs, gen_logprobs=mb.gen_logprobs,
                global_num_tokens=max(total_tokens, 1.0), global_num_seqs=max(total_seqs, 1.0),
            )
            loss.backward()
            loss_total += float(loss.detach())
            weight = mb.num_loss_tokens / max(total_tokens, 1.0)  # token-weighted metric average
            for k, v in metrics.items():
                v = float(v)
                if k == "ratio_min":
                    sums[k] = min(sums.get(k, v), v)
                elif k == "ratio_max":
                    sums[k] = max(sums.get(k, v), v)
                elif k != "num_tokens":  # the step's total is returned below
                    sums[k] = sums.get(k, 0.0) + v * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        self.optimizer.step()
        self.steps += 1
        return {"loss": loss_total, "grad_norm": float(grad_norm), "num_tokens": total_tokens, **sums}

    def sft_step(self, micro_batches: Sequence[MicroBatch]) -> float:
        """Supervised step: mean negative logprob of the loss-masked tokens (warm-up before GRPO)."""
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = max(float(sum(mb.num_loss_tokens for mb in micro_batches)), 1.0)
        loss_total = 0.0
        for mb in micro_batches:
            mb = mb.to(self.device)
            logp = token_logprobs(self.packed_logits(mb), mb.target_ids)
            loss = -(logp * mb.loss_mask).sum() / total_tokens
            loss.backward()
            loss_total += float(loss.detach())
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.optim_cfg.grad_clip)
        self.optimizer.step()
        return loss_total

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Weights in Hugging Face names, as the engine loads them."""
        return [(n, t.detach()) for n, t in self.model.state_dict().items()]
