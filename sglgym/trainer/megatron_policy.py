"""Backend `megatron`: a megatron-core `GPTModel` built from the Hugging Face checkpoint (`convert.py`),
tensor parallel over `megatron.tp` adjacent ranks and data parallel over the rest, wrapped in Megatron's
DistributedDataParallel with its optimizer (distributed optimizer on GPU), trained through megatron's own
schedule with the `forward_step` plug of megatron.py. Same interface as `HFPolicy`.

On GPU the model computes in bf16 with fp32 main weights and fp32 gradient reduction; on CPU fp32.
megatron-core assumes CUDA in a few places, so on CPU it runs only inside tests (tests/megatron_cpu.py).
Pipeline parallelism is not wired (the plug's loss needs whole sequences on the last stage only; not done).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist

from sglgym.kernels import GRPOLossConfig

from . import convert
from .batches import MicroBatch
from .megatron import make_forward_step, make_sft_forward_step
from .policy import HFPolicy, OptimConfig
from .ranks import Ranks
from .totals import StepTotals, step_totals


class MegatronPolicy(HFPolicy):
    def __init__(self, model_path: str, optim: OptimConfig = OptimConfig(), *, ranks: Ranks, tp: int = 1,
                 seed: int = 0, device: str | None = None, activation_checkpointing: bool = False):
        from megatron.core import parallel_state
        from transformers import AutoModelForCausalLM

        torch.manual_seed(seed)
        self.ranks, self.model_path, self.optim_cfg = ranks, model_path, optim
        self.device = device or ranks.device()
        if not parallel_state.model_parallel_is_initialized():
            parallel_state.initialize_model_parallel(tensor_model_parallel_size=tp)
            from megatron.core.tensor_parallel import model_parallel_cuda_manual_seed
            model_parallel_cuda_manual_seed(seed)
        self.tp_group = parallel_state.get_tensor_model_parallel_group()
        self.dp_group = parallel_state.get_data_parallel_group()
        hf = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
        self.hf_config = hf.config
        self.model, self.optimizer = self._build(hf, tp, activation_checkpointing)
        self.reference = None

    def _build(self, hf, tp: int, activation_checkpointing: bool):
        from megatron.core.distributed import DistributedDataParallel, DistributedDataParallelConfig, finalize_model_grads
        from megatron.core.optimizer import OptimizerConfig, get_megatron_optimizer

        cuda = str(self.device).startswith("cuda")
        dtype = torch.bfloat16 if cuda else torch.float32
        extra = {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1} \
            if activation_checkpointing else {}
        model, config = convert.build_gpt_from_hf(
            hf.config, use_cpu_initialization=True, calculate_per_token_loss=True, tensor_model_parallel_size=tp,
            params_dtype=dtype, bf16=cuda, **extra)
        convert.load_hf_into_gpt(model, hf.state_dict(), hf.config)
        model.to(self.device)
        ddp = DistributedDataParallel(config, DistributedDataParallelConfig(
            grad_reduce_in_fp32=True, use_distributed_optimizer=cuda), model)
        config.finalize_model_grads_func = finalize_model_grads
        o = self.optim_cfg
        optimizer = get_megatron_optimizer(OptimizerConfig(
            optimizer="adam", lr=o.lr, weight_decay=o.weight_decay, adam_beta1=o.betas[0], adam_beta2=o.betas[1],
            clip_grad=o.grad_clip, bf16=cuda, params_dtype=dtype, use_distributed_optimizer=cuda), [ddp])
        return ddp, optimizer

    # --- megatron's schedule ------------------------------------------------------------------------
    def _schedule(self, mbs: list[MicroBatch], forward_step, forward_only: bool, collect: bool = False):
        from megatron.core.pipeline_parallel import get_forward_backward_func

        return get_forward_backward_func()(
            forward_step_func=forward_step, data_iterator=iter(mbs), model=[self.model], num_microbatches=len(mbs),
            seq_length=max(mb.input_ids.shape[1] for mb in mbs), micro_batch_size=max(mb.num_seqs for mb in mbs),
            forward_only=forward_only, collect_non_loss_data=collect)

    def _reduce_reported(self, reported: list[dict]) -> dict[str, tuple[float, float]]:
        """Sum megatron's [value * n, n] pairs over micro-batches and data-parallel ranks."""
        keys = sorted({k for r in reported for k in r})
        local = torch.zeros(len(keys), 2, dtype=torch.float64)
        for r in reported:
            for i, k in enumerate(keys):
                if k in r:
                    local[i] += r[k].detach().double().cpu()
        if dist.is_initialized() and dist.get_world_size(self.dp_group) > 1:
            dev = "cuda" if dist.get_backend(self.dp_group) == "nccl" else "cpu"
            local = local.to(dev)
            dist.all_reduce(local, group=self.dp_group)
        return {k: (float(local[i, 0]), float(local[i, 1])) for i, k in enumerate(keys)}

    def _step(self) -> float:
        ok, grad_norm, _ = self.optimizer.step()
        if not ok:
            raise RuntimeError("megatron optimizer step failed (non-finite gradients)")
        return float(grad_norm or 0.0)

    # --- the HFPolicy interface ---------------------------------------------------------------------
    @torch.no_grad()
    def logprobs(self, mb: MicroBatch, temperature: float = 1.0) -> torch.Tensor:
        forward = make_forward_step(GRPOLossConfig(temperature=temperature), StepTotals(1, 1, 1))
        self.model.eval()
        try:
            return self._schedule([mb], forward, forward_only=True, collect=True)[0]
        finally:
            self.model.train()

    def grpo_step(self, micro_batches: Sequence[MicroBatch], loss_cfg: GRPOLossConfig) -> dict[str, float]:
        micro_batches = self.even_out(list(micro_batches))
        totals = step_totals(micro_batches, self.dp_group)
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = self._reduce_reported(self._schedule(micro_batches, make_forward_step(loss_cfg, totals), False))
        grad_norm = self._step()
        out = {"grad_norm": grad_norm, "num_tokens": float(totals.num_tokens),
               "loss": reported["loss"][0] / max(totals.num_tokens, 1)}
        out.update({k: s / max(n, 1.0) for k, (s, n) in reported.items() if k != "loss"})
        return out

    def sft_step(self, micro_batches: Sequence[MicroBatch]) -> float:
        micro_batches = self.even_out(list(micro_batches))
        self.model.zero_grad_buffer()
        self.optimizer.zero_grad()
        reported = self._reduce_reported(self._schedule(micro_batches, make_sft_forward_step(), False))
        self._step()
        total, n = reported["loss"]
        return total / max(n, 1.0)

    # --- checkpoints: each rank keeps its own shards (resume on the same TP x DP layout) ----------------
    def _rank_file(self, directory: Path) -> Path:
        return directory / f"megatron-rank{dist.get_rank() if dist.is_initialized() else 0}.pt"

    def _distributed_optimizer(self) -> bool:
        return any(getattr(o, "ddp_config", None) is not None and o.ddp_config.use_distributed_optimizer
                   for o in getattr(self.optimizer, "chained_optimizers", [self.optimizer]))

    def save_state(self, directory: Path) -> None:
        """This rank's model shard and optimizer state; with the distributed optimizer also its parameter
        state (Adam moments, fp32 main weights), gathered over the data-parallel ranks by megatron."""
        torch.save({"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict()},
                   self._rank_file(directory))
        if self._distributed_optimizer():
            self.optimizer.save_parameter_state(str(directory / "megatron-optimizer-params.pt"))

    def load_state(self, directory: Path) -> None:
        state = torch.load(self._rank_file(directory), weights_only=False)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self._distributed_optimizer():
            self.optimizer.load_parameter_state(str(directory / "megatron-optimizer-params.pt"))

    def freeze_reference(self) -> None:
        raise NotImplementedError("a KL reference policy is not wired for backend megatron (use hf or fsdp)")

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights in Hugging Face names on every rank (tensor-parallel shards gathered)."""
        local = {convert.strip_wrappers(n): p.detach().float().cpu() for n, p in self.model.named_parameters()}
        tp = dist.get_world_size(self.tp_group) if dist.is_initialized() else 1
        shards = [local]
        if tp > 1:
            shards = [None] * tp
            dist.all_gather_object(shards, local, group=self.tp_group)
        return list(convert.megatron_to_hf(convert.gather_tp(shards), self.hf_config))
