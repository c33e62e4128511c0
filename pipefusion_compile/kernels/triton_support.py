"""Which implementation a `pipefusion::` data-movement op runs: the Triton kernel or the torch reference.

`kernels` is a string argument of every such op (and the `kernels` option of the backend):

    "auto"    Triton on CUDA tensors, the torch reference elsewhere (CPU)
    "triton"  always Triton; on CPU tensors only under TRITON_INTERPRET=1 (set before triton is imported:
              the interpreter is chosen when `@triton.jit` decorates the kernels)
    "torch"   always the torch reference

The choice is made from the tensors' device when the op runs or is traced, so a compiled stage graph bakes
it in: inductor sees the Triton kernel on CUDA (through `wrap_triton`) and an opaque reference op on CPU.
"""
from __future__ import annotations

import torch

from ..errors import PipefusionError

try:
    import triton
    import triton.language as tl
    HAS_TRITON = True
except ImportError:  # pragma: no cover - triton ships with torch on Linux
    triton = tl = None
    HAS_TRITON = False

MODES = ("auto", "triton", "torch")


class KernelError(PipefusionError):
    """A kernel was asked for where it cannot run, or got inputs it cannot handle.

    (`kernels/` depends on no backend module; `errors.py`, which only defines the error classes, is shared.)
    """


def jit(fn):
    """`triton.jit` when triton is installed; otherwise the plain function (never launched)."""
    return triton.jit(fn) if HAS_TRITON else fn


def is_interpreted(kernel) -> bool:
    """True when `kernel` was decorated under TRITON_INTERPRET=1 (it runs on the host, on CPU tensors)."""
    try:
        from triton.runtime.interpreter import InterpretedFunction
    except ImportError:
        return False
    return isinstance(kernel, InterpretedFunction)


def is_traced(*tensors: torch.Tensor) -> bool:
    """True while dynamo/AOT trace the op (fake or functional tensors), False when it runs on real data."""
    from torch._subclasses.fake_tensor import FakeTensor
    from torch._subclasses.functional_tensor import FunctionalTensor

    return any(isinstance(t, (FakeTensor, FunctionalTensor)) for t in tensors)


def use_triton(mode: str, kernel, *tensors: torch.Tensor) -> bool:
    """Whether an op called with `tensors` under `mode` runs `kernel` (True) or the torch reference (False)."""
    if mode not in MODES:
        raise KernelError(f"kernels={mode!r}: expected one of {list(MODES)}")
    devices = {t.device for t in tensors}
    if len(devices) != 1:
        raise KernelError(f"pipefusion kernels need all tensors on one device, got {sorted(map(str, devices))}")
    device = devices.pop()
    if mode == "torch":
        return False
    if mode == "auto":
        return HAS_TRITON and device.type == "cuda"
    if not HAS_TRITON:
        raise KernelError("kernels='triton' but triton is not installed")
    if device.type == "cpu" and not is_interpreted(kernel):
        raise KernelError(
            "kernels='triton' on CPU tensors needs the Triton interpreter: set TRITON_INTERPRET=1 before "
            "triton is imported, or use kernels='auto' (the torch reference on CPU)"
        )
    if device.type not in ("cpu", "cuda"):
        raise KernelError(f"kernels='triton' on {device.type} tensors: Triton runs on CUDA (or CPU, interpreted)")
    return True


def launch(kernel, grid, *args, **meta) -> None:
    """Launch `kernel`: through `wrap_triton` so that tracing records it as a graph node, or directly."""
    if is_interpreted(kernel):
        if is_traced(*(a for a in args if isinstance(a, torch.Tensor))):
            raise KernelError(
                "an interpreted Triton kernel (TRITON_INTERPRET=1) cannot be traced into a compiled graph"
            )
        kernel[grid](*args, **meta)
        return
    torch.library.wrap_triton(kernel)[grid](*args, **meta)
