"""fusion_passes::fused_allreduce_rmsnorm on real GPUs (2+ GPUs of one host, under torchrun):

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 \\
        torchrun --nproc-per-node 2 -m pytest tests/test_multigpu_allreduce_rmsnorm.py -q

Every rank runs the same tests in the same order with the same parameters (the op is a
collective), and every skip decision depends on shapes alone, so ranks never diverge.

The expected values follow the reference's arithmetic exactly: r is the fp32 sum of the ranks'
x in rank order rounded to x's dtype, h = r + residual rounded to x's dtype; so residual_out is
compared bitwise, and out (an fp32 reduction over H, rounded once) within one rounding.
"""

import pytest
import torch
import torch.distributed as dist

from fusion_passes import fused_allreduce, kernels
from fusion_passes.ops import rmsnorm_reference

pytestmark = [pytest.mark.cuda, pytest.mark.multigpu]
EPS = 1e-5
ALGORITHMS = [fused_allreduce.ONE_SHOT, fused_allreduce.TWO_SHOT, fused_allreduce.NCCL, None]


@pytest.fixture(scope="module")
def group_name(nccl_group):
    assert kernels.load(), kernels.load_error()
    return nccl_group.group_name


def inputs(tokens, hidden, dtype, with_residual, seed):
    """This rank's x, and a residual that (as in tensor parallelism) every rank shares."""
    rank = dist.get_rank()
    x = torch.randn(
        tokens, hidden, dtype=dtype, device="cuda", generator=torch.Generator("cuda").manual_seed(seed + rank)
    )
    shared = torch.Generator("cuda").manual_seed(seed + 1000)
    residual = torch.randn(tokens, hidden, dtype=dtype, device="cuda", generator=shared) if with_residual else None
    weight = 1 + 0.1 * torch.randn(hidden, dtype=dtype, device="cuda", generator=shared)
    return x, residual, weight


def expected(x, residual, weight):
    parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, x)
    total = torch.zeros_like(x, dtype=torch.promote_types(x.dtype, torch.float32))
    for part in parts:  # rank order, in fp32 (fp64 for fp64), as the kernels sum
        total = total + part
    hidden = total.to(x.dtype)
    if residual is not None:
        hidden = hidden + residual
    return rmsnorm_reference(hidden, weight, EPS), hidden


def assert_same_on_every_rank(*tensors):
    for t in tensors:
        gathered = [torch.empty_like(t) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, t)
        for other in gathered[1:]:
            assert torch.equal(other, gathered[0]), "ranks disagree bitwise"


def assert_matches_reference(out, residual_out, x, residual, weight):
    want_out, want_hidden = expected(x, residual, weight)
    assert torch.equal(residual_out, want_hidden)
    # One rounding of the output dtype; for fp32 a few ulp: rsqrt and the sum over H differ
    # from torch's in the last bits (measured up to 2.7e-7 relative at H=7168).
    rounding = max(torch.finfo(x.dtype).eps, 4 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(out.float(), want_out.float(), rtol=rounding, atol=rounding)
    assert not out.isnan().any()


def run(x, residual, weight, group_name, algorithm):
    ws = fused_allreduce.workspace(group_name, x.device)
    if algorithm not in (None, fused_allreduce.NCCL) and (ws is None or not ws.fits(x, algorithm)):
        pytest.skip(f"{algorithm} workspace does not hold {tuple(x.shape)} {x.dtype}")
    return fused_allreduce.fused_allreduce_rmsnorm_cuda(x, residual, weight, EPS, group_name, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a or "auto")
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hidden", [64, 2880, 4096, 7168])
@pytest.mark.parametrize("tokens", [1, 3, 32, 127, 128, 1000, 8192])
def test_against_reference_and_bitwise_across_ranks(group_name, tokens, hidden, dtype, with_residual, algorithm):
    x, residual, weight = inputs(tokens, hidden, dtype, with_residual, seed=tokens * hidden)
    out, residual_out = run(x, residual, weight, group_name, algorithm)
    assert_matches_reference(out, residual_out, x, residual, weight)
    assert_same_on_every_rank(out, residual_out)


def test_paths_are_chosen_by_size(group_name):
    ws = fused_allreduce.workspace(group_name, torch.device("cuda"))
    world = dist.get_world_size()
    small = torch.empty(1, 2880, dtype=torch.bfloat16, device="cuda")
    large = torch.empty(8192, 2880, dtype=torch.bfloat16, device="cuda")
    assert fused_allreduce.choose_algorithm(small, world, ws) == fused_allreduce.ONE_SHOT
    assert fused_allreduce.choose_algorithm(large, world, ws) == fused_allreduce.NCCL


@pytest.mark.parametrize("algorithm", ALGORITHMS, ids=lambda a: a or "auto")
@pytest.mark.parametrize("tokens", [1, 17, 128])
def test_cuda_graph_replay_with_changing_contents(group_name, tokens, algorithm):
    """The decode use: capture once, replay with new inputs copied into the static buffers."""
    x, residual, weight = inputs(tokens, 2880, torch.bfloat16, True, seed=7)
    run(x, residual, weight, group_name, algorithm)  # warm up outside capture (workspace)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, residual_out = run(x, residual, weight, group_name, algorithm)
    for step in range(20):
        fresh_x, fresh_residual, _ = inputs(tokens, 2880, torch.bfloat16, True, seed=100 + step)
        x.copy_(fresh_x)
        residual.copy_(fresh_residual)
        graph.replay()
        assert_matches_reference(out, residual_out, x, residual, weight)
    assert_same_on_every_rank(out, residual_out)


def test_soak_10000_calls_mixing_paths_in_one_graph(group_name):
    """100 calls per graph on distinct inputs, alternating one-shot and two-shot (different
    grids, both buffer halves), replayed 100 times: no deadlock, and every result intact."""
    calls = []
    for i in range(100):
        algorithm, tokens = (fused_allreduce.ONE_SHOT, 1 + i % 7) if i % 2 else (fused_allreduce.TWO_SHOT, 64 + i)
        calls.append((algorithm, *inputs(tokens, 2880, torch.bfloat16, True, seed=i)))
    want = [expected(x, residual, weight) for _, x, residual, weight in calls]
    for algorithm, x, residual, weight in calls[:2]:
        run(x, residual, weight, group_name, algorithm)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        results = [run(x, residual, weight, group_name, algorithm) for algorithm, x, residual, weight in calls]
    for _ in range(100):
        graph.replay()
    torch.cuda.synchronize()
    for (out, residual_out), (want_out, want_hidden) in zip(results, want):
        assert torch.equal(residual_out, want_hidden)
        bf16_rounding = torch.finfo(torch.bfloat16).eps  # corruption would be far larger
        torch.testing.assert_close(out.float(), want_out.float(), rtol=bf16_rounding, atol=bf16_rounding)


def test_odd_sizes_and_views_take_a_correct_path(group_name):
    """Rows that are not a multiple of 16 bytes, float64, and a non-contiguous slice."""
    for tokens, hidden, dtype in [(5, 36, torch.bfloat16), (3, 64, torch.float64)]:
        x, residual, weight = inputs(tokens, hidden, dtype, True, seed=3)
        out, residual_out = fused_allreduce.fused_allreduce_rmsnorm_cuda(x, residual, weight, EPS, group_name)
        want_out, want_hidden = expected(x, residual, weight)
        torch.testing.assert_close(residual_out, want_hidden)
        torch.testing.assert_close(out, want_out, rtol=torch.finfo(dtype).eps, atol=torch.finfo(dtype).eps)
    padded, residual, weight = inputs(9, 3072, torch.bfloat16, True, seed=5)
    x = padded[:, :2880]
    out, residual_out = fused_allreduce.fused_allreduce_rmsnorm_cuda(
        x, residual[:, :2880], weight[:2880], EPS, group_name
    )
    assert_matches_reference(out, residual_out, x.contiguous(), residual[:, :2880].contiguous(), weight[:2880])
