"""Devices and mixed precision: `train.device` and `train.precision` as torch objects.

CPU is the tested path. On CUDA, `train.precision=bf16|fp16` runs forward and loss under autocast (the
adapter's master weights stay fp32); on CPU every precision trains in fp32 (autocast on CPU is slower for
these models) and a warning says so once per process.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator

import torch

log = logging.getLogger(__name__)

_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_WARNED: set[str] = set()


def resolve_device(name: str) -> torch.device:
    """`train.device`: auto (CUDA if available, else CPU), cpu, cuda or cuda:N."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name} but torch sees no CUDA device; use train.device=auto or cpu.")
    return torch.device(name)


@contextlib.contextmanager
def autocast(device: torch.device, precision: str) -> Iterator[None]:
    """Autocast to `precision` on CUDA; fp32 (no autocast) on other devices."""
    if precision == "fp32":
        yield
        return
    if device.type != "cuda":
        if precision not in _WARNED:
            _WARNED.add(precision)
            log.warning("train.precision=%s applies on CUDA only; training in fp32 on %s.", precision, device)
        yield
        return
    with torch.autocast(device_type="cuda", dtype=_DTYPES[precision]):
        yield
