"""PassConfig: what the pass manager does, and the part of it that keys Inductor's cache."""

from __future__ import annotations

import dataclasses
import os

PASS_NAMES = ("slice_before_allreduce", "allreduce_rmsnorm", "router_gemm", "nan_safe_routing", "router_routing")


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """One switch per pass (all on by default) and the knobs the passes read.

    Every field except ``dump_dir`` changes the compiled result and is hashed into the
    pass manager's ``uuid()``, so Inductor's FX-graph cache never serves a graph that
    was compiled under another configuration. While dumping, the cache is bypassed
    (a cache hit would run no pass, so nothing would be dumped).
    """

    slice_before_allreduce: bool = True
    allreduce_rmsnorm: bool = True
    router_gemm: bool = True
    nan_safe_routing: bool = True
    router_routing: bool = True
    # Largest expert count (router outputs / routing width) the router and routing
    # passes treat as MoE routing; wider top-k (e.g. a sampler over a vocabulary) is
    # left alone.
    max_experts: int = 512
    # Token count up to which fusion_passes::router_gemm uses its own kernel instead of
    # cuBLAS; None keeps the kernel's measured default. Applied process-wide when a
    # graph compiled under this config is installed.
    router_gemm_max_tokens: int | None = None
    # Token count the fused all-reduce's symmetric-memory workspace is sized for, per process
    # group (rows of up to 16 KiB, two regions, two halves); None keeps the default (512).
    # Larger inputs take the NCCL path. Applied when a graph compiled under this config is
    # installed, to workspaces allocated after that.
    allreduce_max_tokens: int | None = None
    # Extra all-reduce ops to recognise, as qualified names "namespace::op" with the
    # schema (Tensor x, str group_name) -> Tensor (a serving engine's own all-reduce).
    allreduce_ops: tuple[str, ...] = ()
    # Where to write before/after graph dumps; FUSION_PASSES_DUMP_DIR if unset.
    dump_dir: str | None = None

    def __post_init__(self):
        if self.max_experts < 1:
            raise ValueError(f"PassConfig.max_experts must be >= 1, got {self.max_experts}")
        if self.router_gemm_max_tokens is not None and self.router_gemm_max_tokens < 0:
            raise ValueError(f"PassConfig.router_gemm_max_tokens must be >= 0, got {self.router_gemm_max_tokens}")
        if self.allreduce_max_tokens is not None and self.allreduce_max_tokens < 1:
            raise ValueError(f"PassConfig.allreduce_max_tokens must be >= 1, got {self.allreduce_max_tokens}")
        for name in self.allreduce_ops:
            if name.count("::") != 1:
                raise ValueError(f"PassConfig.allreduce_ops entries look like 'namespace::op', got {name!r}")
        object.__setattr__(self, "allreduce_ops", tuple(self.allreduce_ops))

    def enabled_passes(self) -> tuple[str, ...]:
        return tuple(name for name in PASS_NAMES if getattr(self, name))

    def resolved_dump_dir(self) -> str | None:
        return self.dump_dir or os.environ.get("FUSION_PASSES_DUMP_DIR") or None

    def cache_key(self) -> dict:
        """The fields that change the compiled result (everything but where dumps go)."""
        key = dataclasses.asdict(self)
        key.pop("dump_dir")
        return key
