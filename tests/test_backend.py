"""The backend as users meet it: by name, as an object, with their own custom pass,
with Inductor's cache on, with dumps, and from the CLI."""

import json
import os
import subprocess
import sys

import pytest
import torch
from test_routing_passes import H, Router
from torch._inductor import config as inductor_config

import fusion_passes
from fusion_passes import cli, dump
from fusion_passes.manager import PassManager
from fusion_passes.testing import assert_matches


def test_by_name_backend_in_a_fresh_process():
    code = """
import torch, fusion_passes
from fusion_passes.models import build_model, example_inputs
m = build_model("qwen3-moe", 1)
with torch.no_grad():
    torch.compile(m, backend="fusion_passes")(*example_inputs(m, 4))
print(fusion_passes.last_report().counts)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "'router_gemm': 1" in out.stdout and "'nan_safe_routing': 1" in out.stdout


def test_report_sums_over_graph_breaks():
    class TwoRouters(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = Router("softmax_topk"), Router("topk_softmax", bias=True)

        def forward(self, x):
            w, ids = self.a(x)
            torch._dynamo.graph_break()
            return self.b(x), w, ids

    torch._dynamo.reset()
    backend = fusion_passes.Backend(codegen=False)
    with torch.no_grad():
        torch.compile(TwoRouters(), backend=backend)(torch.randn(4, H))
    assert len(backend.report.graphs) >= 2
    assert_matches(backend.report, router_gemm=2, nan_safe_routing=2)
    assert sum(g["router_gemm"] for g in backend.report.per_graph()) == 2
    assert fusion_passes.last_report() is backend.report


def test_assert_matches_fails_with_a_readable_diff():
    report = fusion_passes.Report([fusion_passes.report.GraphReport(0, {"router_gemm": 3})])
    with pytest.raises(AssertionError, match=r"router_gemm: expected 4, got 3"):
        assert_matches(report, router_gemm=4)
    with pytest.raises(ValueError, match="unknown pass names"):
        assert_matches(report, routr_gemm=4)


@pytest.mark.parametrize("as_list", [False, True], ids=["one_pass", "list_of_passes"])
def test_users_own_custom_pass_still_runs(as_list):
    seen = []

    class UserPass(torch._inductor.custom_graph_pass.CustomGraphPass):
        def __call__(self, graph):
            seen.append(sum(1 for n in graph.nodes if n.target is fusion_passes.ops.router_routing))

        def uuid(self):
            return "user-pass-v1"

    torch._dynamo.reset()
    backend = fusion_passes.Backend()
    installed = [UserPass(), UserPass()] if as_list else UserPass()
    with inductor_config.patch(post_grad_custom_post_pass=installed, force_disable_caches=True), torch.no_grad():
        torch.compile(Router("softmax_topk"), backend=backend)(torch.randn(4, H))
    assert seen == ([1, 1] if as_list else [1])  # each ran, after ours


def test_uuid_covers_config_and_user_pass():
    base = PassManager(fusion_passes.PassConfig()).uuid()
    assert base == PassManager(fusion_passes.PassConfig()).uuid()
    assert PassManager(fusion_passes.PassConfig(dump_dir="/tmp/x")).uuid() is None  # dumping bypasses the cache
    assert base != PassManager(fusion_passes.PassConfig(router_gemm=False)).uuid()
    assert base != PassManager(fusion_passes.PassConfig(max_experts=64)).uuid()
    assert base != PassManager(fusion_passes.PassConfig(allreduce_ops=("my::all_reduce",))).uuid()

    class Uncacheable:
        def __call__(self, graph):
            pass

    assert PassManager(fusion_passes.PassConfig(), user_pass=Uncacheable()).uuid() is None


def test_fx_graph_cache_stays_on_and_never_serves_another_config(tmp_path, monkeypatch):
    """Compile, hit the cache with the same config (counts replayed), then change the
    config: a recompile with the new counts, not the stale entry."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    module, x = Router("softmax_topk"), torch.randn(4, H)

    def compile_once(config):
        torch._dynamo.reset()
        backend = fusion_passes.Backend(config)
        with inductor_config.patch(fx_graph_cache=True, force_disable_caches=False), torch.no_grad():
            out = torch.compile(module, backend=backend)(x)
        return backend.report, out

    first, out1 = compile_once(fusion_passes.PassConfig())
    second, out2 = compile_once(fusion_passes.PassConfig())
    third, _ = compile_once(fusion_passes.PassConfig(nan_safe_routing=False))
    assert not first.graphs[0].cache_hit and second.graphs[0].cache_hit
    assert first.counts == second.counts and first.counts["nan_safe_routing"] == 1
    assert not third.graphs[0].cache_hit and third.counts["nan_safe_routing"] == 0
    torch.testing.assert_close(out1, out2)


def test_dumps_and_inspect(tmp_path, capsys):
    torch._dynamo.reset()
    backend = fusion_passes.Backend(fusion_passes.PassConfig(dump_dir=str(tmp_path)))
    with torch.no_grad():
        torch.compile(Router("softmax_topk"), backend=backend)(torch.randn(4, H))
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["counts"]["router_gemm"] == 1 and summary["graphs"][0]["counts"]["nan_safe_routing"] == 1
    files = sorted(p.name for p in (tmp_path / "graph_000").iterdir())
    assert "02_router_gemm.before.py" in files and "03_nan_safe_routing.after.py" in files
    assert "f32[4, 8]" in (tmp_path / "graph_000" / "02_router_gemm.after.py").read_text()  # shapes and dtypes
    assert cli.main(["inspect", str(tmp_path), "--pass", "router_gemm"]) == 0
    out = capsys.readouterr().out
    assert "+" in out and "fusion_passes.router_gemm" in out and "aten.mm" in out
    assert cli.main(["inspect", str(tmp_path / "nope")]) == 2


def test_inspect_numbers_graphs_as_its_table_does(tmp_path, capsys):
    # A backward graph compiled at .backward() lands in graph_extra_000, which the table calls graph 1.
    graph = torch.fx.symbolic_trace(torch.nn.ReLU()).graph
    for name in ("graph_000", "graph_extra_000"):
        for stage in ("before", "after"):
            dump.write_stage(tmp_path, name, 0, "router_gemm", stage, graph)
        dump.update_summary(tmp_path, name, {"router_gemm": 0})
    assert "graph 1 = graph_extra_000" in dump.describe(tmp_path)
    assert dump.diff(tmp_path, "router_gemm", 1) == "# graph_extra_000: router_gemm changed nothing\n"
    assert cli.main(["inspect", str(tmp_path), "--pass", "router_gemm", "--graph", "2"]) == 2
    assert "has no graph 2; its graphs are 0..1" in capsys.readouterr().err


def test_dump_dir_from_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("FUSION_PASSES_DUMP_DIR", str(tmp_path))
    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(Router("softmax_topk"), backend=fusion_passes.Backend(codegen=False))(torch.randn(4, H))
    assert dump.describe(tmp_path).count("router_gemm") == 1


def test_cli_check_exit_codes(capsys):
    common = ["--model", "qwen3-moe", "--layers", "1", "--tp", "2", "--no-codegen"]
    good = "slice_before_allreduce=0,allreduce_rmsnorm=3,router_gemm=1,nan_safe_routing=1"
    assert cli.main(["check", *common, "--expect", good]) == 0
    assert cli.main(["check", *common, "--expect", "router_gemm=2"]) == 1
    assert "router_gemm: expected 2, got 1" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        cli.main(["check", *common, "--expect", "bogus=1"])


def test_bad_config_is_rejected():
    with pytest.raises(ValueError, match="max_experts"):
        fusion_passes.PassConfig(max_experts=0)
    with pytest.raises(ValueError, match="namespace::op"):
        fusion_passes.PassConfig(allreduce_ops=("all_reduce",))


def test_reused_dump_dir_describes_the_latest_compilation(tmp_path):
    config = fusion_passes.PassConfig(dump_dir=str(tmp_path))
    for form, routers in (("softmax_topk", 1), ("topk_softmax", 1)):
        torch._dynamo.reset()
        with torch.no_grad():
            torch.compile(Router(form, bias=True), backend=fusion_passes.Backend(config, codegen=False))(
                torch.randn(4, H)
            )
        summary = json.loads((tmp_path / "summary.json").read_text())
        assert summary["counts"]["router_gemm"] == routers and len(summary["graphs"]) == 1


def test_graphs_are_torch_trace_artifacts_for_tlparse(tmp_path):
    code = """
import torch, fusion_passes
from test_routing_passes import H, Router
torch._inductor.config.force_disable_caches = True
with torch.no_grad():
    torch.compile(Router("softmax_topk"), backend=fusion_passes.Backend())(torch.randn(4, H))
"""
    env = dict(
        os.environ,
        TORCH_TRACE=str(tmp_path),
        PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    trace = "".join(p.read_text() for p in tmp_path.iterdir())
    for name in (
        "fusion_passes_router_gemm_before",
        "fusion_passes_router_gemm_after",
        "fusion_passes_nan_safe_routing_after",
    ):
        assert f'"name": "{name}"' in trace


def test_report_sums_over_recompiles():
    torch._dynamo.reset()
    backend = fusion_passes.Backend(codegen=False)
    compiled = torch.compile(Router("softmax_topk"), backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(4, H))
        compiled(torch.randn(6, H))  # a new static shape: a recompile, a second graph
    assert [g.counts["router_gemm"] for g in backend.report.graphs] == [1, 1]
    assert_matches(backend.report, router_gemm=2, nan_safe_routing=2)
