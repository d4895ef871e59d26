"""A CUDA-free stand-in for "a CPU tensor in an NCCL collective": which tensors would be on the host.

On CPU every tensor is on the CPU, so a flag built with `torch.tensor([1])` and one built with
`torch.tensor([1], device=ctx.device)` look alike, though on a GPU machine the first is a host
tensor that NCCL refuses. `HostTensors` is a TorchFunctionMode that follows where each tensor
would live if ctx.device were a GPU:

- made by a factory (torch.tensor, zeros, ones, empty, full, arange, rand*, ...) with no device
  argument, or by `.cpu()`: host;
- made by `.to(<device>)` / `.cuda()`: not host (as on a GPU, a host tensor's `.to(device)` is a
  new tensor, so the mode returns a copy where CPU would return the tensor itself);
- made by any other op whose tensor inputs are all host: host (results of host tensors stay there).

`strict_collectives(host_tensors)` then wraps the collectives' device check so that a host tensor
handed to a collective of a group on ctx.device raises, naming the call: what NCCL would do.
"""
from __future__ import annotations

import contextlib

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten
from torch.utils.weak import WeakIdKeyDictionary

FACTORIES = {torch.tensor, torch.as_tensor, torch.zeros, torch.ones, torch.empty, torch.full, torch.arange,
             torch.rand, torch.randn, torch.randint, torch.randperm, torch.linspace, torch.eye,
             torch.scalar_tensor, torch.from_numpy}
MOVES = {torch.Tensor.to, torch.Tensor.cuda}


def _names_a_device(args, kwargs) -> bool:
    if kwargs.get("device") is not None:
        return True
    return any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) for a in args[1:])


class HostTensors(TorchFunctionMode):
    """Tracks which tensors would be host tensors on a GPU machine (see the module docstring)."""

    def __init__(self):
        super().__init__()
        self._host = WeakIdKeyDictionary()

    def is_host(self, tensor: torch.Tensor) -> bool:
        """Whether `tensor` would be on the host, not on ctx.device."""
        return tensor in self._host

    def _mark(self, out) -> None:
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor):
                self._host[t] = True

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func in FACTORIES:
            if kwargs.get("device") is None:
                self._mark(out)
        elif func in MOVES:
            target = args[1] if len(args) > 1 and isinstance(args[1], torch.Tensor) else None
            if target is not None:  # .to(other): other's place
                if self.is_host(target):
                    self._mark(out)
            elif func is torch.Tensor.cuda or _names_a_device(args, kwargs):
                if out is args[0]:
                    out = out.clone()  # a host tensor moved to the device is a new tensor there
            elif self.is_host(args[0]):  # .to(dtype): stays where it was
                self._mark(out)
        elif func is torch.Tensor.cpu:
            self._mark(out)
        else:
            inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
            if inputs and all(self.is_host(t) for t in inputs):
                self._mark(out)
        return out


@contextlib.contextmanager
def strict_collectives(host_tensors: HostTensors, device: torch.device):
    """Inside: every collective of a group on `device` refuses a would-be host tensor."""
    from parallel import collectives

    original = collectives.check_devices

    def check(call, group, *tensors):
        original(call, group, *tensors)
        if group.device is not None and group.device == device:
            for tensor in tensors:
                if host_tensors.is_host(tensor):
                    raise collectives.DeviceMismatch(
                        f"{call} on group {group.name!r}: a host tensor (made without device=) in a group "
                        f"on {device}; NCCL would refuse it")

    collectives.check_devices = check
    try:
        yield
    finally:
        collectives.check_devices = original
