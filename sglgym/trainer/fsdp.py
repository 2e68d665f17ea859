"""Backend `fsdp`: the Hugging Face model sharded over data-parallel ranks with torch FSDP2 (`fully_shard`).

Launched by torchrun (`sglgym train --nproc N --set backend=fsdp`). Each decoder layer and the root are
sharded; each rank trains on its own share of the step's samples. On CUDA, parameters are gathered in
bf16 and gradients reduced in fp32 over fp32 master weights (`MixedPrecisionPolicy`); on CPU (gloo)
everything is fp32.

FSDP2 averages gradients over ranks (reduce-scatter mean), while each micro-batch loss is already divided
by the step's global denominators: so each loss is multiplied by the world size before backward and the
step equals the single-process step on the whole batch.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_state_dict,
                                                     set_model_state_dict, set_state_dict)
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

from .policy import HFPolicy


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks of a Hugging Face causal LM (`model.model.layers` for Llama/Qwen/Mistral...)."""
    for path in ("model.layers", "transformer.h", "gpt_neox.layers", "model.decoder.layers"):
        obj = model
        for part in path.split("."):
            obj = getattr(obj, part, None)
            if obj is None:
                break
        if isinstance(obj, torch.nn.ModuleList):
            return list(obj)
    raise ValueError(f"{type(model).__name__}: no decoder layer list found to shard")


class FSDPPolicy(HFPolicy):
    def __init__(self, *args, reshard_after_forward: bool = True, **kwargs):
        self.reshard_after_forward = reshard_after_forward
        super().__init__(*args, **kwargs)

    def build_model(self) -> torch.nn.Module:
        if not torch.distributed.is_initialized():
            raise ValueError("fsdp needs torch.distributed (launch with torchrun or `sglgym train --nproc N`)")
        return self._shard(self.load_model())

    def _shard(self, model: torch.nn.Module) -> torch.nn.Module:
        model = model.to(self.device)
        kwargs = {"reshard_after_forward": self.reshard_after_forward}
        if str(self.device).startswith("cuda"):
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        for layer in decoder_layers(model):
            fully_shard(layer, **kwargs)
        fully_shard(model, **kwargs)
        return model

    @property
    def grad_scale(self) -> float:
        return float(self.ranks.world_size)

    def autocast(self):
        import contextlib
        return contextlib.nullcontext()  # MixedPrecisionPolicy casts the gathered parameters instead

    def freeze_reference(self) -> None:
        """A second sharded model with the current weights (shards copied rank by rank)."""
        reference = self._shard(self.load_model())
        with torch.no_grad():
            for ref_param, param in zip(reference.parameters(), self.model.parameters()):
                ref_param.copy_(param)
        self.reference = reference.eval().requires_grad_(False)

    def named_tensors(self) -> list[tuple[str, torch.Tensor]]:
        """Full weights in Hugging Face names on rank 0 (a collective: every rank calls it); [] elsewhere."""
        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return [(name, t.detach()) for name, t in full.items()]

    # --- checkpoints: torch.distributed.checkpoint, each rank writes its own shards ------------------
    def _dcp_state(self) -> dict:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        state = {"model": model_sd, "optim": optim_sd}
        if self.reference is not None:
            state["reference"] = get_model_state_dict(self.reference)
        return state

    def save_state(self, directory: Path) -> None:
        """Sharded model, optimizer (and KL reference) with torch.distributed.checkpoint (a collective;
        `directory` must be on a file system every rank sees)."""
        dcp.save(self._dcp_state(), checkpoint_id=str(directory / "dcp"))

    def load_state(self, directory: Path) -> None:
        state = self._dcp_state()
        dcp.load(state, checkpoint_id=str(directory / "dcp"))  # in place, each rank reads its shards
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"])
        if self.reference is not None:
            set_model_state_dict(self.reference, state["reference"])
