"""Building and loading the CUDA kernels in ``csrc/``.

The kernels are compiled just in time on first use on a CUDA machine (or ahead of
time with ``fusion-passes build``) by ``torch.utils.cpp_extension.load``, which
caches the build under ``TORCH_EXTENSIONS_DIR`` (default ``~/.cache/torch_extensions``)
and rebuilds only when a source changes. The extension registers its kernels for
the ``fusion_passes`` ops under the CUDA dispatch key (``TORCH_LIBRARY_IMPL`` in each
``csrc/*.cu``), so loading it is all it takes for the ops to use them. This module only
loads: it imports nothing else of the package. (``fused_allreduce_rmsnorm``'s CUDA
implementation is Python around the kernels; ``fusion_passes.fused_allreduce`` registers it
when the package is imported, and it loads the kernels on its first call.)

``FUSION_PASSES_KERNELS=0`` keeps the kernels off (the ops then run their references).
A CPU-only install never compiles anything.
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

import torch

log = logging.getLogger(__name__)

EXTENSION_NAME = "fusion_passes_C"
CUDA_FLAGS = (
    "-O3",
    "-std=c++17",
    "--use_fast_math",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-lineinfo",
    "--expt-relaxed-constexpr",
)

_lock = threading.Lock()
_loaded: bool | None = None
_error: str | None = None


def csrc_dir() -> Path:
    """The kernel sources: ``csrc/`` beside the package in a checkout or editable install."""
    return Path(os.environ.get("FUSION_PASSES_CSRC", Path(__file__).resolve().parent.parent / "csrc"))


def sources() -> list[Path]:
    root = csrc_dir()
    return sorted(root.glob("*.cu")) + sorted(root.glob("*.cpp"))


def enabled() -> bool:
    return os.environ.get("FUSION_PASSES_KERNELS", "1") != "0" and torch.cuda.is_available()


def load(verbose: bool = False) -> bool:
    """Build (if needed) and load the CUDA kernels once per process. Returns whether
    they are loaded; on failure the reason is in ``load_error()``."""
    global _loaded, _error
    if _loaded is not None:
        return _loaded
    with _lock:
        if _loaded is not None:
            return _loaded
        if not enabled():
            _error = "no CUDA device, or FUSION_PASSES_KERNELS=0"
            _loaded = False
            return False
        srcs = sources()
        if not srcs:
            _error = f"no kernel sources under {csrc_dir()}"
            _loaded = False
            return False
        from torch.utils.cpp_extension import load as load_extension

        # The op schemas exist already: importing this module imported the package, whose
        # __init__ imports ops (and fused_allreduce, the all-reduce op's CUDA runtime).
        try:
            load_extension(
                name=EXTENSION_NAME,
                sources=[str(s) for s in srcs],
                extra_cflags=["-O3", "-std=c++17"],
                extra_cuda_cflags=list(CUDA_FLAGS),
                extra_ldflags=["-lcuda"],
                is_python_module=False,
                verbose=verbose,
            )
            _loaded = True
        except Exception as exc:  # a failed build must not break the reference path
            _error = f"{type(exc).__name__}: {exc}"
            log.warning("fusion_passes: could not build/load the CUDA kernels: %s", _error)
            _loaded = False
        return _loaded


def load_error() -> str | None:
    return _error


def has_cuda_kernel(op: str) -> bool:
    """Whether ``fusion_passes::op`` has a kernel registered for the CUDA key."""
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"fusion_passes::{op}", "CUDA")


def set_router_gemm_max_tokens(max_tokens: int) -> None:
    """Token count up to which router_gemm uses its own kernel (-1: the measured default).
    A no-op where the kernels are not loaded (the reference has no threshold)."""
    if load() and hasattr(torch.ops.fusion_passes, "_router_gemm_set_max_tokens"):
        torch.ops.fusion_passes._router_gemm_set_max_tokens(max_tokens)
