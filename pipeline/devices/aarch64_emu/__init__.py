"""``aarch64-emu``: the real aarch64 onnxruntime build in an arm64 Debian root, run under qemu-user.

The root is built once by ``pipeline device setup aarch64-emu`` (:func:`setup`): debootstrap stage 1 only (host
native, no emulated stage 2), every downloaded .deb unpacked with ``dpkg-deb -x``, and the PyPI aarch64 wheels of
onnxruntime (the host's version) and numpy installed from the host with ``pip install --target ROOT/opt/ortsite``.

A job then runs as ``qemu-aarch64-static -L ROOT ROOT/usr/bin/python3 device_bench.py job.json result.json``
(:func:`run`): no chroot, no mounts, no binfmt_misc and no root rights at run time. With ``-L`` qemu looks up every
absolute path under ROOT first and falls back to the host path when it is not there, so the job folder (on the
host) and the host's /sys are visible to the guest. qemu 7.2 (Debian bookworm) shows the guest the host's x86
/proc/cpuinfo, on which ``import onnxruntime`` segfaults; :func:`write_cpuinfo` therefore puts an ARM-format
cpuinfo at ROOT/proc/cpuinfo whose ``Features`` are the emulated CPU's HWCAPs (read in the guest with getauxval).

Timings measured here are emulated instruction costs, not ARM latency; what this device checks honestly is that
the artifacts load and run under the aarch64 build and that their logits match the host's.
"""
from .check import check, compare_logits, tiny_model
from .guest import CPUS, QEMU, SITE, STAMP, STAMP_FORMAT, default_root, read_stamp, root_of
from .root import binfmt_status, setup
from .transport import run

__all__ = ["check", "compare_logits", "tiny_model", "CPUS", "QEMU", "SITE", "STAMP", "STAMP_FORMAT", "default_root",
           "read_stamp", "root_of", "run", "binfmt_status", "setup"]
