"""Devices and mixed precision: `train.device` and `train.precision` as torch objects.

CPU is the tested path. `train.precision=bf16|fp16` runs forward and loss under autocast (the adapter's
master weights, the optimiser and DP clipping/noise stay fp32). On CUDA both apply. On CPU only bf16 does, and
only where the CPU has native bf16 matrix instructions (AVX512-BF16 or AMX, as oneDNN reports them): there it
cut a training step to ~0.6× of fp32 on MiniLM and SmolLM2 (BENCHMARKS.md). Elsewhere (fp16 on CPU, bf16
without native support, where autocast is slower than fp32) training stays fp32 and a warning says so once
per process: the user asked for something this machine cannot give.

`train.precision=auto` (the default) is bf16 where it is native (a CUDA device with bf16, a CPU with native
bf16) and fp32 elsewhere, said once per process at INFO level: nothing was asked that could not be given.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = ("auto", "fp32", "bf16", "fp16")  # `train.precision`
_WARNED: set[str] = set()
_SAID: set[str] = set()  # devices whose `auto` choice was logged


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA if available, else CPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but torch sees no CUDA device; use train.device=auto or cpu.")
    return torch.device(name)


@functools.cache  # asked per physical batch by autocast(); the CPU does not change within a process
def cpu_bf16_native() -> bool:
    """Whether this CPU runs bf16 matrix products natively (oneDNN's own check: AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a torch built without oneDNN
        return False


def bf16_native(device: torch.device) -> bool:
    """Whether `device` runs bf16 natively: a CUDA device with bf16 support, or a CPU with native bf16."""
    if device.type == "cuda":
        return bool(torch.cuda.is_bf16_supported())
    return device.type == "cpu" and cpu_bf16_native()


def autocast_dtype(device: torch.device, precision: str) -> torch.dtype | None:
    """The autocast dtype `precision` gives on `device`, or None for plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        return torch.bfloat16 if bf16_native(device) else None
    if device.type == "cuda":
        if precision == "bf16" and not torch.cuda.is_bf16_supported():
            return None  # e.g. a T4 or V100: use train.precision=fp16 there
        return _DTYPES[precision]
    if device.type == "cpu" and precision == "bf16" and cpu_bf16_native():
        return torch.bfloat16
    return None


def resolved_precision(device: torch.device, precision: str) -> str:
    """What `precision` runs as on `device`: ``bf16``, ``fp16`` or ``fp32``."""
    dtype = autocast_dtype(device, precision)
    return "fp32" if dtype is None else next(k for k, v in _DTYPES.items() if v == dtype)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast to `precision` where it helps (see the module docstring); fp32 (no autocast) elsewhere."""
    dtype = autocast_dtype(device, precision)
    if precision == "auto" and device.type not in _SAID:
        _SAID.add(device.type)
        native = "native bf16" if dtype is not None else "no native bf16"
        log.info("train.precision=auto: %s on %s (%s).", resolved_precision(device, precision), device, native)
    if dtype is None:
        if precision not in ("fp32", "auto") and precision not in _WARNED:
            _WARNED.add(precision)
            log.warning(
                "train.precision=%s does not apply on %s (fp16 needs CUDA; bf16 needs a GPU or a CPU with native "
                "bf16): training in fp32.",
                precision,
                device,
            )
        yield
        return
    with torch.autocast(device_type=device.type, dtype=dtype):
        yield
