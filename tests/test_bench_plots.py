"""The plots in docs/img redraw from the recorded results in docs/data with the benches'
--replot, on a machine without a GPU, and their titles name the GPU and torch of the run."""

import json
from pathlib import Path

import pytest

from fusion_passes.bench import allreduce_rmsnorm, e2e, routing

pytest.importorskip("matplotlib")
DATA = Path(__file__).resolve().parent.parent / "docs" / "data"


@pytest.mark.parametrize(
    "bench, results, image",
    [
        (routing, "routing_h100_2026-11-23.json", "routing.png"),
        (routing, "routing_deepseek_h100_2026-12-07_2350.json", "routing_deepseek.png"),
        (allreduce_rmsnorm, "allreduce_rmsnorm_2xh200_2026-11-23.json", "allreduce_rmsnorm.png"),
        (e2e, "e2e_h100_2026-12-07_pdl_off.json", "e2e.png"),
    ],
)
def test_replot_redraws_the_docs_image_from_recorded_results(tmp_path, capsys, bench, results, image):
    assert bench.main(["--replot", str(DATA / results), "--out", str(tmp_path)]) == 0
    assert capsys.readouterr().out == f"wrote {tmp_path / image}\n"
    assert (tmp_path / image).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_titles_name_the_gpu_torch_and_method():
    meta = json.loads((DATA / "routing_h100_2026-11-23.json").read_text())["meta"]
    title = routing.plot_title(meta)
    assert "NVIDIA H100 80GB HBM3, torch 2.11.0+cu130" in title and "30 calls a graph" in title

    results = json.loads((DATA / "allreduce_rmsnorm_2xh200_2026-11-23.json").read_text())
    title = allreduce_rmsnorm.plot_title(results["meta"], results["ops"])
    assert "x [T, 2880] bf16, 2 x NVIDIA H200, torch 2.11.0+cu130" in title and "slower rank" in title
