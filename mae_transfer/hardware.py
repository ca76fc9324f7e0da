"""What this machine's CPU can do, decided in one place: native bf16, and the AMP mode training really uses.

On a CPU without bf16 units (e.g. an AMD EPYC with AVX2 only) bf16 autocast is emulated: a tiny HF ViTMAE
training step took 2.9 s in fp32 and 116 s under bf16 autocast there. So training code asks `resolve_amp`
(or `autocast_dtype`) instead of mapping cfg["amp"] itself, and tools/benchmark.py skips its bf16 rows
on such CPUs. `MAE_TRANSFER_CPU_BF16=0|1` overrides the detection (tests force either branch with it).
"""
from __future__ import annotations

import logging
import os
import platform
import subprocess
import sys
from functools import lru_cache
from pathlib import Path
from typing import Any

from mae_transfer.errors import MaeTransferError

logger = logging.getLogger(__name__)

CPU_BF16_ENV = "MAE_TRANSFER_CPU_BF16"
# /proc/cpuinfo flags that mean bf16 arithmetic in hardware: x86 AVX512-BF16 and AMX-BF16, Arm's FEAT_BF16
# (listed as "bf16" in the Features line of arm64 Linux).
NATIVE_BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
CPUINFO = Path("/proc/cpuinfo")


def cpu_model() -> str:
    """The CPU's name (Linux), else the architecture."""
    try:
        for line in CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def native_bf16_from_cpuinfo(text: str) -> bool | None:
    """Whether a /proc/cpuinfo text lists a bf16 unit; None if it has no flags/Features line at all."""
    found = False
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            found = True
            if NATIVE_BF16_FLAGS & set(value.split()):
                return True
    return False if found else None


@lru_cache(maxsize=1)
def _detected_native_bf16() -> bool:
    try:
        from_cpuinfo = native_bf16_from_cpuinfo(CPUINFO.read_text())
    except OSError:
        from_cpuinfo = None
    if from_cpuinfo is not None:
        return from_cpuinfo
    if sys.platform == "darwin":  # Apple silicon: M2 and later have FEAT_BF16
        try:
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            return out == "1"
        except (OSError, subprocess.SubprocessError):
            return False
    import torch

    if platform.machine().lower() in ("x86_64", "amd64", "i386", "i686"):
        checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
        return any(bool(check()) for check in checks if check is not None)
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())  # on Arm: FEAT_BF16


def cpu_has_native_bf16() -> bool:
    """True if the CPU computes bf16 in hardware (AVX512-BF16, AMX-BF16, Arm BF16); `MAE_TRANSFER_CPU_BF16`
    set to 0 or 1 overrides the detection."""
    override = os.environ.get(CPU_BF16_ENV, "").strip()
    if override:
        if override not in ("0", "1"):
            raise MaeTransferError(f"environment variable {CPU_BF16_ENV} must be 0 or 1, got {override!r}")
        return override == "1"
    return _detected_native_bf16()


def no_bf16_reason() -> str:
    """Why bf16 is not used on this CPU, for logs and reports."""
    return f"{cpu_model()}: no bf16 units: bf16 is emulated, many times slower than fp32 ({CPU_BF16_ENV}=1 forces it)"


def resolve_amp(amp: str, device: Any) -> str:
    """The AMP mode to train with: `amp` itself, except bf16 on a CPU without bf16 units, which becomes
    "none" (fp32) with one warning."""
    import torch

    if amp == "bf16" and torch.device(device).type == "cpu" and not cpu_has_native_bf16():
        logger.warning("amp='bf16' asked for, training in fp32 instead (amp='none'): %s", no_bf16_reason())
        return "none"
    return amp


def autocast_dtype(amp: str, device: Any) -> Any:
    """torch dtype for `torch.autocast` under `resolve_amp(amp, device)`, or None for fp32."""
    import torch

    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(resolve_amp(amp, device))
