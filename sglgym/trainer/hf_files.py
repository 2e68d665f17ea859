"""Full weights as a Hugging Face model directory (safetensors + the model's config files): what the
engine's `/update_weights_from_disk` and `from_pretrained` load, and the `hf` backend's checkpoint format."""

from __future__ import annotations

import shutil
from pathlib import Path

import torch

CONFIG_FILES = ("config.json", "generation_config.json")


def save_hf_weights(named: list[tuple[str, torch.Tensor]], model_path: str, out: Path) -> Path:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    # clone: tied weights share storage, which safetensors refuses to write twice
    save_file({n: t.detach().cpu().contiguous().clone() for n, t in named}, str(out / "model.safetensors"))
    for name in CONFIG_FILES:
        if (Path(model_path) / name).exists():
            shutil.copy(Path(model_path) / name, out / name)
    return out


def load_hf_weights(directory: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(Path(directory) / "model.safetensors"))
