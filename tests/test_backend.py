"""The backend as users meet it: by name, as an object, with their own custom pass,
with Inductor's cache on, with dumps, and from the CLI."""

import dataclasses
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import typing

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


@pytest.fixture
def my_allreduce_op():
    """An engine's all-reduce op of the right schema, and one of a wrong schema."""
    lib = torch.library.Library("fusion_passes_config_test", "DEF")
    lib.define("all_reduce(Tensor x, str group_name) -> Tensor")
    lib.define("all_reduce_sum(Tensor x, str op, str group_name) -> Tensor")
    yield "fusion_passes_config_test::all_reduce"
    lib._destroy()


def test_uuid_covers_config_and_user_pass(my_allreduce_op):
    base = PassManager(fusion_passes.PassConfig()).uuid()
    assert base == PassManager(fusion_passes.PassConfig()).uuid()
    assert PassManager(fusion_passes.PassConfig(dump_dir="/tmp/x")).uuid() is None  # dumping bypasses the cache
    assert base != PassManager(fusion_passes.PassConfig(router_gemm=False)).uuid()
    assert base != PassManager(fusion_passes.PassConfig(max_experts=64)).uuid()
    assert base != PassManager(fusion_passes.PassConfig(upcast_low_precision_routing=False)).uuid()
    assert base != PassManager(fusion_passes.PassConfig(allreduce_ops=(my_allreduce_op,))).uuid()

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
    (router_gemm_after,) = (tmp_path / "graph_000").glob("*_router_gemm.after.py")  # the step depends on PASS_NAMES
    steps = sorted(p.name.split("_", 1)[0] for p in (tmp_path / "graph_000").glob("*.before.py"))
    assert steps == [f"{i:02d}" for i in range(len(fusion_passes.PASS_NAMES))]  # every enabled pass, in order
    assert "f32[4, 8]" in router_gemm_after.read_text()  # shapes and dtypes
    assert cli.main(["inspect", str(tmp_path), "--pass", "router_gemm"]) == 0
    out = capsys.readouterr().out
    assert "+" in out and "fusion_passes.router_gemm" in out and "aten.mm" in out
    assert out.endswith("\n") and not out.endswith("\n\n")  # no blank line after the diff
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


def _annotation_of(name):
    return typing.get_type_hints(fusion_passes.PassConfig)[name]


def _wrong_values(name):
    """Values of the wrong type for the field ``name``, from its annotation alone, so that
    a field added later is covered without a change here (an annotation of a new kind
    is a KeyError: add its wrong values)."""
    hint = _annotation_of(name)
    if typing.get_origin(hint) is tuple:
        return ["ns::op", ("ns::op", 1), [None]]
    (kind,) = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    return {bool: ["no", 1, 0, None], int: ["64", 1.5, True], str: [123, b"dumps", ["dumps"]]}[kind]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(fusion_passes.PassConfig)])
def test_every_field_rejects_a_wrong_type_at_construction(field):
    for value in _wrong_values(field):
        with pytest.raises(ValueError, match=rf"PassConfig\.{field} must be .*, got {re.escape(repr(value))}$"):
            fusion_passes.PassConfig(**{field: value})


def test_every_pass_has_a_bool_switch_and_none_is_only_for_optional_fields():
    for name in fusion_passes.PASS_NAMES:
        assert _annotation_of(name) is bool
        assert fusion_passes.PassConfig(**{name: False}).enabled_passes() == tuple(
            n for n in fusion_passes.PASS_NAMES if n != name
        )
    for field in ("router_gemm_max_tokens", "allreduce_max_tokens", "dump_dir"):
        assert getattr(fusion_passes.PassConfig(**{field: None}), field) is None


def test_values_out_of_range_are_rejected():
    with pytest.raises(ValueError, match="PassConfig.max_experts must be >= 1, got 0"):
        fusion_passes.PassConfig(max_experts=0)
    with pytest.raises(ValueError, match="PassConfig.router_gemm_max_tokens must be >= 0, got -1"):
        fusion_passes.PassConfig(router_gemm_max_tokens=-1)
    with pytest.raises(ValueError, match="PassConfig.allreduce_max_tokens must be >= 1, got 0"):
        fusion_passes.PassConfig(allreduce_max_tokens=0)


def test_accepted_forms_are_normalised(my_allreduce_op):
    config = fusion_passes.PassConfig(dump_dir=pathlib.Path("dumps"), allreduce_ops=[my_allreduce_op])
    assert config.dump_dir == "dumps" and config.allreduce_ops == (my_allreduce_op,)
    assert hash(config) == hash(fusion_passes.PassConfig(dump_dir="dumps", allreduce_ops=(my_allreduce_op,)))


def test_allreduce_ops_are_checked_at_construction(my_allreduce_op):
    assert fusion_passes.PassConfig(allreduce_ops=(my_allreduce_op,)).allreduce_ops == (my_allreduce_op,)
    with pytest.raises(ValueError, match="entries look like 'namespace::op', got 'all_reduce'"):
        fusion_passes.PassConfig(allreduce_ops=("all_reduce",))
    with pytest.raises(ValueError, match="names 'nope::all_reduce', which is not a registered op"):
        fusion_passes.PassConfig(allreduce_ops=("nope::all_reduce",))
    with pytest.raises(ValueError, match=r"whose schema is .*all_reduce_sum\(Tensor x, str op, str group_name\).*must be \(Tensor x, str group_name\) -> Tensor"):
        fusion_passes.PassConfig(allreduce_ops=("fusion_passes_config_test::all_reduce_sum",))


def test_backend_takes_a_config_none_or_a_mapping():
    assert fusion_passes.Backend().config == fusion_passes.PassConfig()
    assert fusion_passes.Backend({"router_gemm": False}).config == fusion_passes.PassConfig(router_gemm=False)
    fields = [f.name for f in dataclasses.fields(fusion_passes.PassConfig)]
    with pytest.raises(ValueError, match=re.escape(f"unknown PassConfig fields ['routr_gemm']; the fields are {fields}")):
        fusion_passes.Backend({"routr_gemm": False})
    with pytest.raises(ValueError, match="PassConfig.router_gemm must be a bool, got 'no'"):
        fusion_passes.Backend({"router_gemm": "no"})
    with pytest.raises(ValueError, match="expected a PassConfig, None or a mapping of PassConfig fields, got str 'router_gemm'"):
        fusion_passes.Backend("router_gemm")
    with pytest.raises(ValueError, match="Backend\\(codegen=...\\) must be a bool, got 'no'"):
        fusion_passes.Backend(codegen="no")


def test_a_disabled_pass_is_off_not_zero():
    torch._dynamo.reset()
    backend = fusion_passes.Backend({"router_gemm": False}, codegen=False)
    with torch.no_grad():
        torch.compile(Router("softmax_topk"), backend=backend)(torch.randn(4, H))
    assert backend.report.counts["router_gemm"] == 0  # every key is present
    rows = {line.split()[0]: line.split()[1:] for line in backend.report.table().splitlines()[1:]}
    assert rows["router_gemm"] == ["off", "off"] and rows["nan_safe_routing"] == ["1", "1"]
    assert rows["slice_before_allreduce"] == ["0", "0"]


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


def _torch_trace(directory) -> pathlib.Path:
    """The TORCH_TRACE log of compiling a router (all passes on, no cache) in a fresh process."""
    code = """
import torch, fusion_passes
from test_routing_passes import H, Router
torch._inductor.config.force_disable_caches = True
with torch.no_grad():
    torch.compile(Router("softmax_topk"), backend=fusion_passes.Backend())(torch.randn(4, H))
"""
    env = dict(
        os.environ,
        TORCH_TRACE=str(directory),
        PYTHONPATH=os.pathsep.join(filter(None, [os.path.dirname(__file__), os.environ.get("PYTHONPATH")])),
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    (log,) = directory.glob("*.log")
    return log


ARTIFACTS = [f"fusion_passes_{name}_{stage}" for name in fusion_passes.PASS_NAMES for stage in ("before", "after")]


def test_graphs_are_torch_trace_artifacts_for_tlparse(tmp_path):
    trace = _torch_trace(tmp_path).read_text()
    for name in ARTIFACTS:
        assert f'"name": "{name}"' in trace


@pytest.mark.skipif(shutil.which("tlparse") is None, reason="tlparse is not installed (pip install tlparse)")
def test_tlparse_shows_the_artifacts(tmp_path):
    """The command docs/inspecting.md gives (tlparse 0.4's --latest does not take a directory)."""
    log = _torch_trace(tmp_path / "trace")
    out = subprocess.run(
        ["tlparse", str(log), "-o", str(tmp_path / "tl_out"), "--overwrite", "--no-browser"], capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    index = (tmp_path / "tl_out" / "index.html").read_text()
    for name in ARTIFACTS:
        (artifact,) = (tmp_path / "tl_out").glob(f"*/{name}_[0-9]*.txt")
        assert artifact.name in index  # linked from the report
        assert "def forward" in artifact.read_text()


def test_report_sums_over_recompiles():
    torch._dynamo.reset()
    backend = fusion_passes.Backend(codegen=False)
    compiled = torch.compile(Router("softmax_topk"), backend=backend, dynamic=False)
    with torch.no_grad():
        compiled(torch.randn(4, H))
        compiled(torch.randn(6, H))  # a new static shape: a recompile, a second graph
    assert [g.counts["router_gemm"] for g in backend.report.graphs] == [1, 1]
    assert_matches(backend.report, router_gemm=2, nan_safe_routing=2)
