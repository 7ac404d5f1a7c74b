"""The end-to-end benchmark script runs (on CPU: tiny shapes, a smoke test of the
script; the numbers come from a GPU)."""

import importlib.util
import json

from fusion_passes.bench import e2e


def test_e2e_bench_smoke_on_cpu(tmp_path, capsys):
    argv = ["--device", "cpu", "--models", "qwen3-moe,gpt-oss-e32", "--tokens", "3", "--layers", "1"]
    assert e2e.main([*argv, "--replays", "2", "--out", str(tmp_path)]) == 0
    rows = json.loads((tmp_path / "results.json").read_text())["rows"]
    assert [r["model"] for r in rows] == ["smoke-qwen3-moe", "smoke-gpt-oss-e32"]
    for row in rows:
        assert row["counts"]["router_gemm"] == row["counts"]["nan_safe_routing"] == row["counts"]["router_routing"] == 1
        assert row["relative_difference"] < 5e-2  # bf16 end to end; numerics are tested elsewhere
        assert row["inductor_step_us"] > 0 and row["fusion_passes_router_routing_us"] > 0
    assert "router+routing" in capsys.readouterr().out
    if importlib.util.find_spec("matplotlib"):
        assert (tmp_path / "e2e.png").stat().st_size > 0


def test_in_step_router_routing_sums_the_standalone_kernels_per_layer():
    row = {
        "layers": 2,
        "fusion_passes_router_routing_by_kernel_us": {"router_gemm_kernel": 3.0, "topk_routing_kernel": 1.5, "cast": 1.0},
        # In the step the cast is fused away and the experts' kernels are not router + routing.
        "fusion_passes_step_by_kernel_us": {"router_gemm_kernel": 6.0, "topk_routing_kernel": 3.0, "grouped_gemm": 400.0},
    }
    assert e2e.in_step_router_routing_us(row, "fusion_passes") == 4.5
