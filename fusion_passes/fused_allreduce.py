"""The CUDA implementation of ``fusion_passes::fused_allreduce_rmsnorm``: the symmetric-memory
workspace, the choice of path, and the launches of the kernels in ``csrc/allreduce_rmsnorm.cu``.

Paths, chosen by the size of x (every rank computes the same choice from the same shape):

    one_shot  each rank reads every peer's rows and reduces them in rank order, then adds the
              residual and normalizes: one kernel, one barrier.
    two_shot  each rank reduces a share of the rows, then every rank reads each row's sum from
              its owner and normalizes: one kernel, two barriers, less NVLink traffic.
    nccl      NCCL all-reduce, then one fused add + RMSNorm kernel. Used for large inputs, for
              groups whose ranks are not all on this host with peer access, and where no
              workspace exists yet while a CUDA graph is being captured.

The workspace is allocated once per process group, on the first call outside CUDA-graph
capture: two halves (successive calls alternate, see the .cu file), each holding an input and a
reduced region of ``max_tokens`` rows of up to 16 KiB (H = 8192 in bf16). ``max_tokens`` comes
from ``PassConfig.allreduce_max_tokens`` (default 512); it bounds the symmetric-memory paths.

``FUSION_PASSES_ALLREDUCE_TIMEOUT_S`` (default 60) bounds how long a rank waits for its peers
inside the kernel; a peer that disagrees on the call or never comes is reported, not waited on.

Imports: this module needs ``ops`` (the argument checks, the composite) and ``kernels`` (loaded
on the first call); neither imports it. The package's ``__init__`` imports it, which registers
``fused_allreduce_rmsnorm_cuda`` for the CUDA dispatch key.
"""

from __future__ import annotations

import dataclasses
import os
import socket

import torch
import torch.distributed as dist

from . import kernels, ops

ONE_SHOT, TWO_SHOT, NCCL = "one_shot", "two_shot", "nccl"
ALGORITHMS = (ONE_SHOT, TWO_SHOT, NCCL)
_KERNEL_ALGORITHM = {ONE_SHOT: 1, TWO_SHOT: 2}

DEFAULT_MAX_TOKENS = 512
WORKSPACE_ROW_BYTES = 16 * 1024
MAX_BLOCKS = 64
# Largest x (bytes per rank) each symmetric-memory path takes, by world size. Measured on
# 2 x H200 (docs/benchmarks.md): one-shot beat two-shot at every size and NCCL + the fused
# norm up to 5.9 MB (T=1024 at H=2880 bf16), NCCL won from 11.8 MB. Two-shot reads
# (W-1)/W of one-shot's bytes for the reduction plus a gather, which pays off only for
# larger W: the entries for W > 2 are estimates, not yet measured (needs 4-8 GPUs).
ONE_SHOT_MAX_BYTES = {2: 6 * 1024 * 1024}
TWO_SHOT_MAX_BYTES = {2: 0}
ONE_SHOT_MAX_BYTES_UNMEASURED = 256 * 1024
TWO_SHOT_MAX_BYTES_UNMEASURED = 2 * 1024 * 1024

_max_tokens = DEFAULT_MAX_TOKENS


def set_max_tokens(max_tokens: int) -> None:
    """Token count the workspaces allocated from now on are sized for."""
    global _max_tokens
    if max_tokens < 1:
        raise ValueError(f"allreduce max_tokens must be >= 1, got {max_tokens}")
    _max_tokens = max_tokens


def timeout_s() -> float:
    return float(os.environ.get("FUSION_PASSES_ALLREDUCE_TIMEOUT_S", "60"))


@dataclasses.dataclass
class Workspace:
    buffer: torch.Tensor  # keeps the symmetric allocation alive
    handle: object  # torch's _SymmetricMemory
    counters: torch.Tensor  # int32 [2]: epoch, blocks finished (the kernel's)
    half_bytes: int

    def fits(self, x: torch.Tensor, algorithm: str) -> bool:
        regions = 2 if algorithm == TWO_SHOT else 1
        return regions * x.numel() * x.element_size() <= self.half_bytes


# group name -> its workspace, or None where the group cannot use symmetric memory.
_workspaces: dict[str, Workspace | None] = {}


def _peers_reachable(group: dist.ProcessGroup, device: torch.device) -> bool:
    """Whether every rank of the group is on this host and this GPU has P2P access to theirs.
    Collective; every rank gets the same answer."""
    placements: list = [None] * group.size()
    dist.all_gather_object(placements, (socket.gethostname(), device.index), group=group)
    same_host = all(host == placements[0][0] for host, _ in placements)
    local_ok = same_host and all(
        index == device.index or torch.cuda.can_device_access_peer(device.index, index) for _, index in placements
    )
    verdict = torch.tensor([int(local_ok)], device=device)
    dist.all_reduce(verdict, op=dist.ReduceOp.MIN, group=group)
    return bool(verdict.item())


def _create_workspace(group_name: str, device: torch.device) -> Workspace | None:
    from torch.distributed import _symmetric_memory as symm_mem
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    if group.size() > 8 or not _peers_reachable(group, device):
        return None
    half_bytes = 2 * _max_tokens * WORKSPACE_ROW_BYTES
    buffer = symm_mem.empty(2 * half_bytes, dtype=torch.uint8, device=device)
    handle = symm_mem.rendezvous(buffer, group_name)
    if handle.signal_pad_size < torch.ops.fusion_passes._symm_allreduce_signal_pad_bytes():
        raise RuntimeError(
            f"fused_allreduce_rmsnorm: symmetric memory signal pads are {handle.signal_pad_size} bytes, "
            f"the kernel needs {torch.ops.fusion_passes._symm_allreduce_signal_pad_bytes()}"
        )
    counters = torch.zeros(2, dtype=torch.int32, device=device)
    return Workspace(buffer, handle, counters, half_bytes)


def workspace(group_name: str, device: torch.device) -> Workspace | None:
    """The group's workspace, created on first use (a collective: every rank of the group
    must make this call, which they do since they all call the op)."""
    if group_name not in _workspaces:
        if torch.cuda.is_current_stream_capturing():
            return None  # allocating under capture is not allowed; NCCL serves this graph
        _workspaces[group_name] = _create_workspace(group_name, device)
    return _workspaces[group_name]


def kernels_take(x: torch.Tensor) -> bool:
    """Whether the kernels handle x's rows: fp32/bf16/fp16, a multiple of 16 bytes, at most 64 KiB."""
    row_bytes = x.shape[-1] * x.element_size()
    return x.dtype in (torch.float32, torch.bfloat16, torch.float16) and row_bytes % 16 == 0 and row_bytes <= 64 * 1024


def choose_algorithm(x: torch.Tensor, world_size: int, ws: Workspace | None) -> str:
    """The path for x; a function of the shape and dtype alone, so every rank agrees."""
    nbytes = x.numel() * x.element_size()
    symmetric_ok = ws is not None and world_size >= 2 and kernels_take(x)
    one_shot_max = ONE_SHOT_MAX_BYTES.get(world_size, ONE_SHOT_MAX_BYTES_UNMEASURED)
    two_shot_max = TWO_SHOT_MAX_BYTES.get(world_size, TWO_SHOT_MAX_BYTES_UNMEASURED)
    if symmetric_ok and nbytes <= one_shot_max and ws.fits(x, ONE_SHOT):
        return ONE_SHOT
    if symmetric_ok and nbytes <= two_shot_max and ws.fits(x, TWO_SHOT):
        return TWO_SHOT
    return NCCL


def _aligned(t: torch.Tensor | None) -> torch.Tensor | None:
    """A contiguous, 16-byte aligned tensor with t's values (a copy only where needed)."""
    if t is None:
        return None
    t = t.contiguous()
    return t if t.data_ptr() % 16 == 0 else t.clone()


def _kernels_loaded() -> bool:
    """Load the kernels once (building them if needed); without them the op runs its
    reference's arithmetic, with the same one-time warning as the other ops."""
    if kernels.load() and kernels.has_cuda_kernel("_fused_add_rmsnorm"):
        return True
    ops._warn_reference_on_cuda("fused_allreduce_rmsnorm")
    return False


def fused_allreduce_rmsnorm_cuda(x, residual, weight, eps, group_name, algorithm: str | None = None):
    """The op on CUDA tensors. ``algorithm`` forces a path (tests and benchmarks); by default
    it is chosen by size."""
    ops.check_fused_allreduce_rmsnorm_args(x, residual, weight)
    hidden = x.shape[-1]
    x2d = _aligned(x.reshape(-1, hidden))
    res2d = _aligned(None if residual is None else residual.reshape(-1, hidden))
    weight = weight.contiguous()
    if not kernels_take(x) or not _kernels_loaded():
        return ops.fused_allreduce_rmsnorm_composite(x, residual, weight, eps, group_name)
    from torch.distributed.distributed_c10d import _resolve_process_group

    group = _resolve_process_group(group_name)
    ws = workspace(group_name, x.device) if group.size() > 1 else None
    if algorithm is None:
        algorithm = choose_algorithm(x2d, group.size(), ws)
    elif algorithm not in ALGORITHMS:
        raise ValueError(f"fused_allreduce_rmsnorm: algorithm must be one of {ALGORITHMS}, got {algorithm!r}")
    elif algorithm != NCCL and (ws is None or not ws.fits(x2d, algorithm)):
        raise ValueError(f"fused_allreduce_rmsnorm: {algorithm} needs a workspace that fits x {tuple(x.shape)}")
    out, residual_out = torch.empty_like(x2d), torch.empty_like(x2d)
    if algorithm == NCCL:
        reduced = x2d
        if group.size() > 1:
            reduced = torch.ops._c10d_functional.wait_tensor(
                torch.ops._c10d_functional.all_reduce(x2d, "sum", group_name)
            )
        torch.ops.fusion_passes._fused_add_rmsnorm(reduced, res2d, weight, eps, out, residual_out)
    else:
        handle = ws.handle
        torch.ops.fusion_passes._symm_allreduce_rmsnorm(
            x2d,
            res2d,
            weight,
            eps,
            out,
            residual_out,
            handle.buffer_ptrs_dev,
            handle.signal_pad_ptrs_dev,
            ws.half_bytes,
            handle.signal_pad_size,
            handle.rank,
            handle.world_size,
            ws.counters,
            _KERNEL_ALGORITHM[algorithm],
            MAX_BLOCKS,
            timeout_s(),
        )
    return out.view(x.shape), residual_out.view(x.shape)


# The op's CUDA implementation, registered when the package imports this module (whether or
# not the kernels can be built: without them it runs the reference's arithmetic).
_impl_lib = torch.library.Library(ops.NAMESPACE, "IMPL")
_impl_lib.impl("fused_allreduce_rmsnorm", fused_allreduce_rmsnorm_cuda, "CUDA")
