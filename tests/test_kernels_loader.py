"""The CUDA-kernel loader on a machine without a GPU: nothing is built, the ops keep
running their references, and `fusion-passes build` says why it did nothing."""

import pytest
import torch

from fusion_passes import cli, kernels, ops

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only behaviour")


def test_cpu_only_install_builds_nothing():
    assert not kernels.enabled()
    assert kernels.load() is False
    assert "no CUDA device" in kernels.load_error()
    assert not kernels.has_cuda_kernel("router_gemm")


def test_every_kernel_source_is_found():
    names = {p.name for p in kernels.sources()}
    assert {"router_gemm.cu", "topk_routing.cu"} <= names


def test_ops_still_work_through_their_references():
    x, w = torch.randn(3, 16), torch.randn(4, 16)
    torch.testing.assert_close(ops.router_gemm(x, w, None, None), x @ w.t())
    weights, ids = ops.topk_routing(torch.randn(3, 4), 2, "softmax", True, None)
    assert ids.shape == (3, 2) and torch.allclose(weights.sum(-1), torch.ones(3))


def test_build_command_explains_itself(capsys):
    assert cli.main(["build"]) == 1
    assert "no CUDA device" in capsys.readouterr().err


def test_router_threshold_setting_is_a_no_op_without_kernels():
    kernels.set_router_gemm_max_tokens(64)  # must not raise


def test_loading_registers_nothing_the_package_import_did_not():
    # fused_allreduce_rmsnorm's CUDA implementation (Python around the kernels) is registered
    # by importing the package, not by the loader: the loader only loads.
    assert kernels.has_cuda_kernel("fused_allreduce_rmsnorm")
    assert kernels.load() is False


def test_the_loader_imports_no_other_module_of_the_package():
    import ast
    import inspect

    tree = ast.parse(inspect.getsource(kernels))
    relative = [node for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.level > 0]
    assert relative == [], "kernels.py must not import the package's modules (import circle)"
