"""A simulated accelerator on CPU: catches, without a GPU, a host tensor reaching device code.

Inside `simulated_device()` every tensor is either *host* (made by a factory without `device=`, or by
`.cpu()` — where it would live on a GPU machine) or *device* (parameters, and whatever `.to(device)`,
`.cuda()` or a factory with `device=` makes). An op that mixes a host and a device tensor with at least
one dimension raises `DeviceMismatch`, as CUDA would ("Expected all tensors to be on the same device").
0-dim tensors may mix, as CUDA allows for CPU scalars.
"""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten, tree_map

FACTORIES = {torch.tensor, torch.zeros, torch.ones, torch.full, torch.empty, torch.arange, torch.rand, torch.randn,
             torch.randint, torch.linspace, torch.as_tensor, torch.eye}
TO_DEVICE = {torch.Tensor.to, torch.Tensor.cuda}
TO_HOST = {torch.Tensor.cpu}


class DeviceMismatch(RuntimeError):
    pass


class HostTensor(torch.Tensor):
    """Marks a tensor that lives on the host; the mode below does all the bookkeeping."""
    __torch_function__ = torch._C._disabled_torch_function_impl


def _is_host(t) -> bool:
    return isinstance(t, HostTensor)


def _as_host(t):
    return t.as_subclass(HostTensor) if isinstance(t, torch.Tensor) and not isinstance(t, torch.nn.Parameter) else t


def _as_device(t):
    return t.as_subclass(torch.Tensor) if isinstance(t, HostTensor) else t


def _moves_to_device(args, kwargs) -> bool:
    """`t.to(...)` names a device (positional str/device, or device=): a move; `t.to(dtype)` is not."""
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (str, torch.device)) for a in args[1:])


class simulated_device(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.checked = 0  # ops that met a host tensor (so a test can tell the guard saw something)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in FACTORIES:
            out = func(*args, **kwargs)
            return out if kwargs.get("device") is not None else tree_map(_as_host, out)
        if func in TO_HOST:
            return tree_map(_as_host, func(*args, **kwargs))
        if func in TO_DEVICE and (func is torch.Tensor.cuda or _moves_to_device(args, kwargs)):
            return tree_map(_as_device, func(*args, **kwargs))
        flat, _ = tree_flatten((args, kwargs))
        tensors = [t for t in flat if isinstance(t, torch.Tensor)]
        host = [t for t in tensors if _is_host(t)]
        if not host:
            return func(*args, **kwargs)
        self.checked += 1
        device = [t for t in tensors if not _is_host(t) and t.dim() > 0]
        if device and any(t.dim() > 0 for t in host):
            name = getattr(func, "__qualname__", getattr(func, "__name__", str(func)))
            raise DeviceMismatch(f"{name}: a host tensor {tuple(host[0].shape)} met a device tensor "
                                 f"{tuple(device[0].shape)} (on a GPU this is 'Expected all tensors to be on the "
                                 "same device')")
        out = func(*args, **kwargs)
        if device:  # a host scalar used with device tensors: the result is on the device
            return out
        return tree_map(_as_host, out)
