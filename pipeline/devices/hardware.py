"""What the target's onnxruntime conv kernels want channel counts to be a multiple of.

onnxruntime's CPU provider (MLAS) rewrites convolutions into the NCHWc layout at graph optimisation level
``all``, padding every channel count up to the block size of its kernels:
- x86-64 with AVX-512F: 16 (MLAS ``NchwcBlockSize`` for the AVX-512 kernels);
- other x86-64 (AVX2/FMA3, SSE): 8;
- aarch64: 1 -- measured on the PyPI aarch64 wheel (onnxruntime 1.32.0, run under qemu-user on cortex-a72,
  neoverse-n1 and max; ``pipeline device check``): the optimised graph at level ``all`` holds plain ``Conv`` and
  ``com.microsoft:FusedConv`` nodes (NCHW im2col + MLAS SGEMM) and no ``com.microsoft.nchwc`` op, so nothing is
  padded and every channel removed counts. (Source builds with ``onnxruntime_USE_ARM_NEON_NCHWC=ON`` do use a
  16-channel block, ``MLAS_NEON_NCHWC_BLOCK_SIZE``; set ``prune.align = 16`` explicitly for those.)
A pruned width that is not a multiple of the block is padded back up and keeps the cost of the padded width.
"""
from __future__ import annotations

import platform


def cpu_flags(cpuinfo: str = "/proc/cpuinfo") -> set[str]:
    try:
        with open(cpuinfo) as f:
            for line in f:
                if line.lower().startswith(("flags", "features")):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def nchwc_block(machine: str | None = None, flags: set[str] | None = None) -> int:
    """The channel block onnxruntime's NCHWc kernels use on ``machine`` (default: this host)."""
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return 1
    if machine in ("x86_64", "amd64", "i386", "i686", "x86"):
        flags = cpu_flags() if flags is None else flags
        return 16 if "avx512f" in flags else 8
    return 1


def resolve_align(align: int | str) -> int:
    return nchwc_block() if align == "auto" else int(align)
