"""The add + RMSNorm kernel behind fused_allreduce_rmsnorm's NCCL path (its input already
reduced), on one GPU, against the reference's arithmetic: residual_out bitwise, out within one
rounding (a few ulp in fp32). The all-reduce paths: tests/test_multigpu_allreduce_rmsnorm.py."""

import pytest
import torch

from fusion_passes import kernels
from fusion_passes.ops import rmsnorm_reference

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module", autouse=True)
def loaded():
    assert kernels.load(), kernels.load_error()


@pytest.mark.parametrize("weight_dtype", ["same", "fp32"])
@pytest.mark.parametrize("with_residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("hidden", [64, 2880, 7168])
@pytest.mark.parametrize("tokens", [0, 1, 5, 511, 512, 8192])
def test_add_rmsnorm_matches_the_reference(tokens, hidden, dtype, with_residual, weight_dtype):
    generator = torch.Generator("cuda").manual_seed(tokens + hidden)
    x = torch.randn(tokens, hidden, dtype=dtype, device="cuda", generator=generator)
    residual = torch.randn(tokens, hidden, dtype=dtype, device="cuda", generator=generator) if with_residual else None
    weight = 1 + 0.1 * torch.randn(hidden, device="cuda", generator=generator)
    weight = weight.to(dtype if weight_dtype == "same" else torch.float32)
    out, residual_out = torch.empty_like(x), torch.empty_like(x)
    torch.ops.fusion_passes._fused_add_rmsnorm(x, residual, weight, 1e-5, out, residual_out)
    hidden_want = x if residual is None else x + residual
    assert torch.equal(residual_out, hidden_want)
    rounding = max(torch.finfo(dtype).eps, 4 * torch.finfo(torch.float32).eps)
    torch.testing.assert_close(out, rmsnorm_reference(hidden_want, weight, 1e-5), rtol=rounding, atol=rounding)
