"""A non-CPU stand-in device, so a CPU-only machine can check what a GPU run needs: every tensor the
step creates lives on the device of the data it serves, collectives get only device tensors (NCCL
takes nothing else), and the step reads the device at most once.

PyTorch's `meta` device plays the GPU: tensors with shapes and dtypes but no data. Inside
`DeviceRecorder`:
- the collectives (`torch.distributed.all_reduce`, `all_gather`, `all_to_all_single`, ...) are replaced
  by recorders that check every tensor they get is on the stand-in device and return at once (the
  process groups themselves are real, built before: topology discovery exchanges host objects);
- every torch call is watched (a TorchFunctionMode): one that returns a CPU tensor (a buffer made
  without naming its device) or that mixes a CPU tensor with a device tensor raises `DeviceError`
  at the offending line;
- host reads of device tensors (`item`, `tolist`, `bool`, `int`, `float`) are counted and answered
  (1 / True), since meta tensors hold no values.

    model = to_standin(model)                  # parameters on meta, attributes kept
    opt = teonspeed.TEON(model, ...)           # built outside the recorder (real gloo)
    set_standin_grads(model)
    with DeviceRecorder() as rec:
        opt.step()
    rec.host_reads                             # how many times the step read the device
"""

from __future__ import annotations

import traceback
from typing import Any, Dict, List

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_flatten

COLLECTIVES = (
    "all_reduce",
    "all_gather",
    "all_gather_into_tensor",
    "all_to_all_single",
    "all_to_all",
    "reduce_scatter",
    "reduce_scatter_tensor",
    "broadcast",
    "reduce",
    "batch_isend_irecv",
)
_HOST_READS = {
    torch.Tensor.item: "item",
    torch.Tensor.tolist: "tolist",
    torch.Tensor.__bool__: "bool",
    torch.Tensor.__int__: "int",
    torch.Tensor.__float__: "float",
    torch.Tensor.__index__: "index",
}


class DeviceError(AssertionError):
    """A tensor on the wrong device: a CPU buffer in a device step, or a CPU tensor handed to a collective."""


class _Done:
    def wait(self, *args: Any, **kwargs: Any) -> bool:
        return True

    def is_completed(self) -> bool:
        return True


def _tensors(value: Any) -> List[torch.Tensor]:
    leaves, _ = tree_flatten(value)
    return [t for t in leaves if isinstance(t, torch.Tensor)]


def _where() -> str:
    """The innermost teonspeed frame (or the caller's): where the wrong tensor came from."""
    frames = [f for f in traceback.extract_stack() if "device_standin" not in f.filename]
    ours = [f for f in frames if "teonspeed" in f.filename or "/plugin/" in f.filename]
    f = (ours or frames)[-1]
    return f"{f.filename}:{f.lineno} ({f.line})"


class DeviceRecorder(TorchFunctionMode):
    def __init__(self, device: str = "meta") -> None:
        super().__init__()
        self.device = torch.device(device)
        self.collectives: List[str] = []
        self.host_reads: List[str] = []
        self._saved: Dict[str, Any] = {}

    # -- collectives -----------------------------------------------------------------------------
    def _recorder(self, name: str):
        def record(*args: Any, **kwargs: Any):
            if name == "batch_isend_irecv":  # a list of P2POps: their tensors, and a list of works back
                args = ([op.tensor for op in args[0]],)
            for t in _tensors((args, {k: v for k, v in kwargs.items() if k != "group"})):
                if t.device != self.device:
                    raise DeviceError(
                        f"dist.{name} got a tensor on {t.device} (shape {tuple(t.shape)}, "
                        f"{t.dtype}); the process group's device is {self.device}. "
                        f"Called from {_where()}"
                    )
            self.collectives.append(name)
            if name == "batch_isend_irecv":
                return [_Done()]
            return _Done() if kwargs.get("async_op") else None

        return record

    def __enter__(self) -> "DeviceRecorder":
        for name in COLLECTIVES:
            self._saved[name] = getattr(dist, name)
            setattr(dist, name, self._recorder(name))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        try:
            super().__exit__(*exc)
        finally:
            for name, fn in self._saved.items():
                setattr(dist, name, fn)
            self._saved.clear()

    # -- every torch call ------------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        read = _HOST_READS.get(func)
        if read is not None and isinstance(args[0], torch.Tensor) and args[0].device == self.device:
            self.host_reads.append(f"{read} at {_where()}")
            if read == "tolist":
                return torch.ones(args[0].shape, dtype=torch.int64).tolist()
            return True if read == "bool" else 1
        inputs = _tensors((args, kwargs))
        if any(t.device == self.device for t in inputs):
            cpu = [t for t in inputs if t.device.type == "cpu"]
            if cpu:
                raise DeviceError(
                    f"{_name(func)} mixes a CPU tensor (shape {tuple(cpu[0].shape)}) with "
                    f"{self.device} tensors at {_where()}"
                )
        out = func(*args, **kwargs)
        made = [t for t in _tensors(out) if t.device.type == "cpu"]
        if made and read is None:
            raise DeviceError(
                f"{_name(func)} created a tensor on the CPU (shape {tuple(made[0].shape)}, "
                f"{made[0].dtype}) during a {self.device} step at {_where()}: name its device"
            )
        return out


def _name(func: Any) -> str:
    return getattr(func, "__qualname__", None) or getattr(func, "__name__", None) or repr(func)


def to_standin(module: torch.nn.Module, device: str = "meta") -> torch.nn.Module:
    """Move every parameter to the stand-in device in place, keeping the Parameter attributes that
    Megatron and teonspeed read (tensor_model_parallel, partition_dim, fused layouts...).
    `module.to("meta")` would drop them."""
    moved: Dict[int, torch.nn.Parameter] = {}
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is None:
                continue
            if id(p) not in moved:
                new = torch.nn.Parameter(torch.empty_like(p, device=device), requires_grad=p.requires_grad)
                new.__dict__.update(p.__dict__)
                moved[id(p)] = new
            mod._parameters[name] = moved[id(p)]
    return module


def set_standin_grads(params) -> None:
    for p in params:
        if p.requires_grad:
            p.grad = torch.empty_like(p)
