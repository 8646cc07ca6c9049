"""What this machine computes fast: the precision ``auto`` resolves to.

bf16 pays only where the hardware multiplies bf16 natively: CUDA GPUs of compute capability 8.0+
(``torch.cuda.is_bf16_supported``), and x86 CPUs with AMX or AVX512-BF16. Elsewhere torch emulates
it: on an AVX2-only EPYC (2 cores, torch 2.13) a bf16 ``F.linear`` runs at about 20 GFLOP/s
against 90 GFLOP/s in fp32, and a plain bf16 matmul (attention's ``bmm``) at 0.9 GFLOP/s — autocast
there makes training several times *slower* (docs/benchmarks.md, train_throughput). So
``train.precision: auto`` is bf16 where it is native and fp32 everywhere else, and
``model.dtype: auto`` stores the frozen base in bf16 exactly when the run computes in bf16 (half
the memory, and no per-forward re-cast of every frozen weight by autocast).

fp16 is never chosen automatically: it needs loss scaling, which skips steps on some models
(``train.precision: fp16`` stays available by name).
"""

from __future__ import annotations

import functools
import os
import platform

import torch

#: CPU feature flags (``/proc/cpuinfo``) under which oneDNN multiplies bf16 natively.
_NATIVE_BF16_CPU_FLAGS = ("amx_bf16", "avx512_bf16")


@functools.lru_cache(maxsize=1)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux ``/proc/cpuinfo``; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def native_bf16(device: torch.device) -> bool:
    """Whether ``device`` multiplies bf16 natively (so bf16 autocast is faster than fp32)."""
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        return platform.machine() in ("x86_64", "AMD64") and any(f in cpu_flags() for f in _NATIVE_BF16_CPU_FLAGS)
    return False  # mps and others: fp32 (their bf16 autocast support varies by version)


def resolve_precision(precision: str, device: torch.device) -> str:
    """``train.precision`` as it runs on ``device``: ``auto`` becomes ``bf16`` or ``fp32``."""
    if precision != "auto":
        return precision
    return "bf16" if native_bf16(device) else "fp32"


def resolve_dtype(dtype: str, precision: str = "auto", device: torch.device | None = None) -> str:
    """``model.dtype`` as loaded: ``auto`` is ``bfloat16`` when the run computes in bf16 on
    ``device`` (default: the device ``train.device: auto`` picks), else ``float32``."""
    if dtype != "auto":
        return dtype
    if device is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return "bfloat16" if resolve_precision(precision, device) == "bf16" else "float32"


def describe_precision(precision: str, device: torch.device) -> str:
    """One line for the run header: what ``precision`` runs as here, and why when it was ``auto``."""
    got = resolve_precision(precision, device)
    if precision != "auto":
        return got
    why = "native bf16 on this device" if got == "bf16" else (
        f"no native bf16 on this {device.type.upper()}"
        + (f" ({torch.backends.cpu.get_cpu_capability()})" if device.type == "cpu" else ""))
    return f"auto → {got} ({why})"


def runtime_config(cfg, device: torch.device):
    """``cfg`` with ``train.precision`` and ``model.dtype`` resolved for ``device`` (a copy; the
    run directory keeps the config as written, so ``auto`` resumes as ``auto``)."""
    precision = resolve_precision(cfg.train.precision, device)
    dtype = resolve_dtype(cfg.model.dtype, cfg.train.precision, device)
    if cfg.model.dtype == "auto" and cfg.offsite.enabled and cfg.offsite.train == "full":
        dtype = "float32"  # whole blocks train inside the model, in fp32 (autocast still applies)
    if (precision, dtype) == (cfg.train.precision, cfg.model.dtype):
        return cfg
    return cfg.model_copy(update={"train": cfg.train.model_copy(update={"precision": precision}),
                                  "model": cfg.model.model_copy(update={"dtype": dtype})})


@functools.lru_cache(maxsize=1)
def _libc_malloc_trim():
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return libc.malloc_trim
    except (OSError, AttributeError):  # not glibc (musl, macOS, Windows): nothing to trim
        return None


#: entries in each of the two per-shape kernel caches behind torch's CPU matmuls (below).
KERNEL_CACHE_CAPACITY = 64


def bound_kernel_caches(capacity: int = KERNEL_CACHE_CAPACITY) -> None:
    """Cap the caches in which oneDNN (torch's CPU matmul library) keeps a JIT-compiled kernel and
    its buffers per matmul shape: oneDNN's primitive cache (``ONEDNN_PRIMITIVE_CACHE_CAPACITY``) and
    ideep's (``LRU_CACHE_CAPACITY``), 1,024 entries each by default. With bf16 on AMX every new
    padded length is a new shape, so over a federated run they filled round after round: the
    quickstart's resident set grew ~130 MB a round and its peak 13% from round 2 to 4; capped at 64
    both stay flat from round 2 on, at the same speed and to the same numbers (docs/benchmarks.md,
    train_memory). Both are read once, when the process first multiplies, so the CLI and
    :func:`fedtune.run.run` call this first; a value the user set (also oneDNN's older
    ``DNNL_PRIMITIVE_CACHE_CAPACITY``) is kept."""
    if "DNNL_PRIMITIVE_CACHE_CAPACITY" not in os.environ:
        os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", str(capacity))
    os.environ.setdefault("LRU_CACHE_CAPACITY", str(capacity))


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

    Called after each client's exchange: between clients every activation of the last one is
    free, but glibc keeps the freed pages in its arenas, so a later, differently shaped batch finds
    them fragmented and the process's resident set creeps up round after round (docs/benchmarks.md,
    train_memory). Trimming costs a few milliseconds; no library does it for us."""
    trim = _libc_malloc_trim()
    if trim is not None:
        trim(0)
