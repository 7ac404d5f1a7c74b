"""``fusion_passes::fused_allreduce_rmsnorm`` across real processes (gloo, CPU).

docs/ops.md: r = sum of x over the process group; h = r + residual (or r) in x's dtype;
out = h * rsqrt(mean(h^2, -1) + eps) * weight computed in fp32 and rounded once;
returns (out, h); every rank gets bitwise identical outputs.

One ``torch.multiprocessing.start_processes`` per world size (2 and 4) runs every case; each
rank saves its outputs to a temporary directory and the tests below compare them
with a float64 computation made here, in the parent, from the same deterministic
per-rank inputs.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import free_port

import fusion_passes  # noqa: F401  (registers the ops)

EPS = 1e-6


@dataclass(frozen=True)
class Case:
    dtype: torch.dtype
    residual: bool
    hidden: int
    tokens: int
    inputs: str  # "grid": sums over ranks are exact; "random": plain randn

    @property
    def name(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        residual = "residual" if self.residual else "no_residual"
        return f"{self.inputs}-{dtype}-{residual}-H{self.hidden}-T{self.tokens}"


GRID_CASES = [
    Case(dtype, residual, hidden, tokens, "grid")
    for dtype in (torch.float32, torch.bfloat16)
    for residual in (False, True)
    for hidden in (64, 72)
    for tokens in (1, 7)
]
RANDOM_CASES = [
    Case(dtype, residual, 72, 7, "random") for dtype in (torch.float32, torch.bfloat16) for residual in (False, True)
]
CASES = GRID_CASES + RANDOM_CASES


def make_inputs(case: Case, rank: int):
    """x differs per rank; residual and weight are the same on every rank (as in tensor
    parallelism, where they are replicated).

    "grid" x are multiples of 2^-5 below 2 in magnitude: exact in bf16, and every partial
    sum of up to 4 of them is exact in bf16 too, so r does not depend on the order or
    precision in which gloo adds (which the contract leaves open). The grid residual is
    a multiple of 2^-12, so r + residual needs ~16 significant bits: exact in fp32, and
    rounded (once) when x is bf16."""
    index = CASES.index(case)
    shape = (case.tokens, case.hidden)
    g = torch.Generator().manual_seed(1000 * index + rank)
    shared = torch.Generator().manual_seed(1000 * index + 999)
    if case.inputs == "grid":
        x = torch.randint(-63, 64, shape, generator=g).double() / 32
        residual = torch.randint(-255, 256, shape, generator=shared).double() / 4096
    else:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        residual = torch.randn(shape, generator=shared, dtype=torch.float64)
    weight = 1 + 0.5 * torch.randn(case.hidden, generator=shared, dtype=torch.float64)
    return (
        x.to(case.dtype),
        residual.to(case.dtype) if case.residual else None,
        weight.to(case.dtype),
    )


def _worker(rank: int, world_size: int, port: int, out_dir: str) -> None:
    os.environ["MASTER_ADDR"] = "127.0.0.1"
    os.environ["MASTER_PORT"] = str(port)
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60)
    )
    try:
        group_name = dist.group.WORLD.group_name
        results = {}
        for case in CASES:
            x, residual, weight = make_inputs(case, rank)
            out, residual_out = torch.ops.fusion_passes.fused_allreduce_rmsnorm(x, residual, weight, EPS, group_name)
            results[case.name] = {"out": out, "residual_out": residual_out}
        torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda n: f"world{n}")
def gloo_run(request, tmp_path_factory):
    """Runs every case on ``world_size`` gloo processes; returns (world_size, per-rank results)."""
    world_size = request.param
    out_dir = tmp_path_factory.mktemp(f"gloo_world{world_size}")
    # fork: the ranks start in well under a second, where spawn re-imports torch and
    # fusion_passes (with torch._dynamo) in every rank, seconds each. Forking is safe here:
    # no CUDA, and each rank uses one intra-op thread, so no OpenMP pool is entered. A
    # parent that already holds a default process group would hand it to the children,
    # so then spawn fresh interpreters instead.
    start_method = "spawn" if dist.is_initialized() else "fork"
    mp.start_processes(
        _worker,
        args=(world_size, free_port(), str(out_dir)),
        nprocs=world_size,
        join=True,
        start_method=start_method,
    )
    return world_size, [torch.load(out_dir / f"rank{rank}.pt") for rank in range(world_size)]


# ------------------------------------------------------------------------ helpers


def ulp(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    finfo = torch.finfo(dtype)
    magnitude = values.double().abs().clamp_min(finfo.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(magnitude))) * finfo.eps


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.view({2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def rmsnorm_float64(h, weight, eps):
    h64 = h.double()
    return h64 * torch.rsqrt(h64.pow(2).mean(dim=-1, keepdim=True) + eps) * weight.double()


# fp32: the reference computes in fp32 (squares, a length-H mean, rsqrt, two products),
# a few fp32 roundings besides the last; bf16 results are dominated by their final rounding.
RMSNORM_ULPS = {torch.float32: 4, torch.bfloat16: 1}


def assert_out_is_rmsnorm_of(out, h, weight, dtype):
    expected = rmsnorm_float64(h, weight, EPS)
    rounded = expected.to(dtype).double()
    diff = (out.double() - rounded).abs()
    allowed = RMSNORM_ULPS[dtype] * ulp(rounded, dtype)
    assert bool((diff <= allowed).all()), (
        f"out is up to {(diff / ulp(rounded, dtype)).max().item()} ulp from the float64 RMSNorm of h"
    )


# -------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_every_rank_gets_bitwise_identical_outputs(gloo_run, case):
    world_size, results = gloo_run
    first = results[0][case.name]
    for rank in range(1, world_size):
        mine = results[rank][case.name]
        for key in ("out", "residual_out"):
            assert mine[key].dtype == first[key].dtype and mine[key].shape == first[key].shape
            assert torch.equal(bits(mine[key]), bits(first[key])), f"rank {rank} {key} differs from rank 0"


@pytest.mark.parametrize("case", GRID_CASES, ids=lambda c: c.name)
def test_matches_float64_sum_over_ranks(gloo_run, case):
    world_size, results = gloo_run
    inputs = [make_inputs(case, rank) for rank in range(world_size)]
    r = sum(x.double() for x, _, _ in inputs)
    assert torch.equal(r.to(case.dtype).double(), r), "test precondition: the grid sum is exact"
    _, residual, weight = inputs[0]
    h = r if residual is None else r + residual.double()  # exact in float64 (and in fp32)
    if case.residual and case.dtype == torch.bfloat16:
        assert not torch.equal(h.to(case.dtype).double(), h), "test precondition: bf16 must round h"

    for rank in range(world_size):
        out, residual_out = results[rank][case.name]["out"], results[rank][case.name]["residual_out"]
        assert out.dtype == case.dtype and residual_out.dtype == case.dtype
        assert out.shape == residual_out.shape == (case.tokens, case.hidden)
        assert torch.equal(residual_out, h.to(case.dtype)), f"rank {rank}: h is not (sum of x) + residual rounded once"
        assert_out_is_rmsnorm_of(out, h.to(case.dtype), weight, case.dtype)


@pytest.mark.parametrize("case", RANDOM_CASES, ids=lambda c: c.name)
def test_random_inputs_close_to_float64_sum_over_ranks(gloo_run, case):
    # For general inputs the order and precision of gloo's additions are not part of the
    # contract: each of the (world_size - 1) additions of the reduction and the residual
    # add may round in x's dtype, u = eps/2 each, relative to the magnitudes involved.
    world_size, results = gloo_run
    inputs = [make_inputs(case, rank) for rank in range(world_size)]
    _, residual, weight = inputs[0]
    exact = sum(x.double() for x, _, _ in inputs)
    magnitude = sum(x.double().abs() for x, _, _ in inputs)
    if residual is not None:
        exact = exact + residual.double()
        magnitude = magnitude + residual.double().abs()
    u = torch.finfo(case.dtype).eps / 2
    allowed = world_size * u * magnitude + ulp(exact, case.dtype)

    h = results[0][case.name]["residual_out"]
    assert bool(((h.double() - exact).abs() <= allowed).all()), "h is not the sum over ranks (+ residual)"
    assert_out_is_rmsnorm_of(results[0][case.name]["out"], h, weight, case.dtype)
