"""Where a model runs and in what precision: one answer for training, evaluation, prediction,
the online learner and every strategy.

``train.device`` (and ``--device``) takes ``auto`` (CUDA when present, else the CPU), ``cpu``,
``cuda``, ``cuda:N`` or ``mps``. A device that is named but absent is an error, not a silent
fall-back to the CPU: a user who asked for a GPU and got hours on a CPU has lost a day.

Mixed precision (``train.bf16``, whose name predates GPUs): on the CPU, bfloat16 autocast
only where the CPU computes it natively (emulated bf16 is slower than float32). On CUDA,
``auto`` means bfloat16 where the GPU supports it (Ampere and later), else float16 with a
gradient scaler (float16's range is too narrow for unscaled gradients); ``on`` asks for
bfloat16 and is refused on a GPU without it. On MPS, float32 unless ``on``.
"""

from __future__ import annotations

import contextlib
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch

DEVICE_PATTERN = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def usable_core_ids() -> set[int]:
    """The ids of the cores this process may run on (its affinity mask, which a container's CPU
    set narrows)."""
    try:
        return set(os.sched_getaffinity(0))
    except AttributeError:  # macOS and Windows have no affinity mask
        return set(range(os.cpu_count() or 1))


def usable_cores() -> int:
    """How many cores this process may run on (:func:`usable_core_ids`)."""
    return len(usable_core_ids())


def cpu_has_native_bf16() -> bool:
    """True when the CPU computes bfloat16 natively (AVX512-BF16 or AMX); emulated bf16 is slower than fp32."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def check_device_name(spec: str, option: str | None = None) -> str:
    name = str(spec).strip().lower()
    if not DEVICE_PATTERN.match(name):
        where = f"{option} {spec}: unknown device" if option else f"unknown device {spec!r}"
        raise ValueError(f"{where}; use auto, cpu, cuda, cuda:N or mps")
    return name


def resolve_device(spec: str = "auto", *, option: str = "train.device") -> torch.device:
    """The torch device ``spec`` names; a device this machine lacks is refused, naming ``option``."""
    spec = check_device_name(spec, option)
    if spec == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    device = torch.device(spec)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{option} {spec}: CUDA is not available on this machine "
                             f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'})")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ValueError(f"{option} {spec}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                             f"numbered from 0")
    if device.type == "mps" and not (hasattr(torch.backends, "mps") and torch.backends.mps.is_available()):
        raise ValueError(f"{option} {spec}: Apple's MPS backend is not available on this machine")
    return device


@dataclass(frozen=True)
class Precision:
    """The autocast a device runs under: ``dtype`` None = float32; ``scaled`` = float16 with a
    gradient scaler."""

    device: torch.device
    dtype: torch.dtype | None

    @property
    def scaled(self) -> bool:
        return self.dtype == torch.float16

    @property
    def name(self) -> str:
        return {None: "float32", torch.bfloat16: "bfloat16 autocast",
                torch.float16: "float16 autocast with a gradient scaler"}[self.dtype]

    def autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.dtype)

    def grad_scaler(self) -> "torch.amp.GradScaler":
        return torch.amp.GradScaler(self.device.type, enabled=self.scaled)


def choose_precision(device: torch.device, bf16: str = "auto") -> Precision:
    """``train.bf16`` (auto | on | off) on ``device``; see the module's docstring."""
    if bf16 == "off":
        return Precision(device, None)
    if device.type == "cuda":
        supported = torch.cuda.is_bf16_supported()
        if bf16 == "on" and not supported:
            raise ValueError(f"train.bf16 on: {torch.cuda.get_device_name(device)} has no bfloat16; "
                             "use train.bf16=auto (float16 with a gradient scaler) or off")
        return Precision(device, torch.bfloat16 if supported else torch.float16)
    if device.type == "cpu":
        return Precision(device, torch.bfloat16 if bf16 == "on" or cpu_has_native_bf16() else None)
    return Precision(device, torch.bfloat16 if bf16 == "on" else None)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
