"""The add + RMSNorm kernel behind fused_allreduce_rmsnorm's NCCL path (its input already
reduced), on one GPU, against the reference's arithmetic: residual_out bitwise, out within one
rounding (a few ulp in fp32), in every kernel layout the benchmark compares (the one-block-a-row
kernel, and row groups of as few warps as keep a lane at 2..16 chunks, persistent or not, with
and without a PDL launch). The all-reduce paths: tests/test_multigpu_allreduce_rmsnorm.py."""

import pytest
import torch

from fusion_passes import kernels
from fusion_passes.bench.allreduce_rmsnorm import LOCAL_LAYOUTS
from fusion_passes.ops import rmsnorm_reference

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def loaded():
    assert kernels.load(), kernels.load_error()


@pytest.fixture(params=list(LOCAL_LAYOUTS))
def layout(request):
    torch.ops.fusion_passes._fused_add_rmsnorm_set_layout(*LOCAL_LAYOUTS[request.param])
    yield request.param
    torch.ops.fusion_passes._fused_add_rmsnorm_reset_layout()


def add_rmsnorm(x, residual, weight, out=None, residual_out=None):
    out = torch.empty_like(x) if out is None else out
    residual_out = torch.empty_like(x) if residual_out is None else residual_out
    torch.ops.fusion_passes._fused_add_rmsnorm(x, residual, weight, 1e-5, out, residual_out)
    return out, residual_out


def assert_matches_reference(x, residual, weight, out, residual_out):
    hidden_want = x if residual is None else x + residual
    assert torch.equal(residual_out, hidden_want)
    rounding = max(torch.finfo(x.dtype).eps, 4 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(out, rmsnorm_reference(hidden_want, weight, 1e-5), rtol=rounding, atol=rounding)


@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hidden", [64, 2880, 4096, 7168])
@pytest.mark.parametrize("tokens", [0, 1, 5, 511, 512, 8192])
def test_add_rmsnorm_matches_the_reference(layout, tokens, hidden, dtype, with_residual, weight_dtype):
    generator = torch.Generator("cuda").manual_seed(tokens + hidden)
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda", generator=generator)
    residual = torch.randn(tokens, hidden, dtype=dtype, device="cuda", generator=generator) if with_residual else None
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)
    weight = weight.to(dtype if weight_dtype == "same" else torch.float32)
    assert_matches_reference(x, residual, weight, *add_rmsnorm(x, residual, weight))


@pytest.mark.parametrize("dtype, hidden", [(torch.bfloat16, 32768), (torch.float32, 16384), (torch.bfloat16, 13320)])
def test_the_longest_rows_take_the_widest_row_groups(layout, dtype, hidden):
    # 64 KiB rows: 4096 chunks, more than 2 or 4 chunks a lane can hold in 512 threads; 13320
    # leaves a partial last chunk run in every row group size.
    generator = torch.Generator("cuda").manual_seed(hidden)
    x, residual = torch.randn(2, 37, hidden, dtype=dtype, device="cuda", generator=generator)
    weight = (1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)).to(dtype)
    assert_matches_reference(x, residual, weight, *add_rmsnorm(x, residual, weight))


def test_a_chain_of_norms_in_a_cuda_graph_reads_each_input_after_it_is_written(layout):
    # Each call reads the previous call's out. With PDL a call starts before the previous one
    # ends; its griddepcontrol.wait must come before its first read, or it reads the NaNs that
    # fill the intermediate buffers before every replay.
    tokens, hidden, links = 4096, 2880, 4
    x = torch.empty(tokens, hidden, dtype=torch.bfloat16, device="cuda")
    weight = torch.ones(hidden, dtype=torch.bfloat16, device="cuda")
    outs = [torch.empty_like(x) for _ in range(links)]
    residual_outs = [torch.empty_like(x) for _ in range(links)]

    def chain():
        for i in range(links):
            add_rmsnorm(x if i == 0 else outs[i - 1], x, weight, outs[i], residual_outs[i])

    x.normal_()
    chain()  # warm-up outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        chain()
    for replay in range(3):
        x.copy_(torch.randn(tokens, hidden, device="cuda", generator=torch.Generator("cuda").manual_seed(replay)))
        for t in outs + residual_outs:
            t.fill_(float("nan"))
        graph.replay()
        torch.cuda.synchronize()
        previous = x
        for i in range(links):
            assert_matches_reference(previous, x, weight, outs[i], residual_outs[i])
            previous = outs[i]


def test_bad_layouts_are_rejected():
    with pytest.raises(ValueError, match="chunks_per_lane"):
        torch.ops.fusion_passes._fused_add_rmsnorm_set_layout(3, True, True)
