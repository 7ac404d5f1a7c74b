"""The command line as a new user meets it: one line and status 2 for every bad argument,
checks that check what they say, help that lists what exists, progress on request,
and no pile of temporary directories."""

import json
import subprocess
import sys

import pytest
import torch

from fusion_passes import PASS_NAMES, cli, progress
from fusion_passes.bench import available
from fusion_passes.models import MODELS

# The fastest compile that still has every pass's pattern: one MoE layer, TP 2, no codegen.
QWEN_TP2 = ["--model", "qwen3-moe", "--layers", "1", "--tp", "2", "--no-codegen"]


def run(argv, capsys):
    """(exit status, stdout, stderr) of ``fusion-passes argv`` run in this process."""
    try:
        code = cli.main(argv)
    except SystemExit as exc:  # argparse's errors and --help
        code = exc.code
    out, err = capsys.readouterr()
    return code, out, err


def assert_usage_error(argv, message, capsys):
    code, out, err = run(argv, capsys)
    assert code == 2, (out, err)
    assert err.count("\n") == 1 and message in err, err
    assert "Traceback" not in err and not out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["demo", "--layers", "0"], "argument --layers: expected an integer >= 1, got 0"),
        (["demo", "--layers", "-1"], "argument --layers: expected an integer >= 1, got -1"),
        (["demo", "--layers", "two"], "argument --layers: expected an integer >= 1, got 'two'"),
        (["demo", "--tp", "0"], "argument --tp: expected an integer >= 1, got 0"),
        (["demo", "--tokens", "-1"], "argument --tokens: expected an integer >= 1, got -1"),
        (["demo", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
        (["demo", "--model", "gpt5"], "argument --model: invalid choice: 'gpt5'"),
        (["demo", "--disable", "router_gem"], "argument --disable: unknown passes ['router_gem']"),
        (["check", "--expect", ""], "argument --expect: expected at least one PASS=N"),
        (["check", "--expect", " , "], "argument --expect: expected at least one PASS=N"),
        (["check", "--expect", "router_gemm=1,router_gemm=2"], "argument --expect: router_gemm is given twice"),
        (["check", "--expect", "router_gemm=-1"], "expected PASS=N with PASS in"),
        (["check", "--expect", "bogus=1"], "expected PASS=N with PASS in"),
        (["inspect", "/tmp", "--graph", "-1"], "argument --graph: expected an integer >= 0, got -1"),
        (["bench", "compile-time", "--model", "gpt5"], "argument --model: invalid choice: 'gpt5'"),
        (["bench", "compile-time", "--layers", "0"], "argument --layers: expected an integer >= 1, got 0"),
        (["bench", "compile-time", "--repeats", "0"], "argument --repeats: expected an integer >= 1, got 0"),
        (["bench", "compile-time", "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_arguments_are_one_line_and_status_2(argv, message, capsys):
    assert_usage_error(argv, message, capsys)


def test_tp_that_does_not_divide_the_model_is_one_line_before_compiling(capsys):
    assert_usage_error(
        ["demo", *QWEN_TP2[:4], "--tp", "3"], "--tp 3: vocab_size (128) is not divisible by the tensor-parallel world size (3)", capsys
    )
    import torch.distributed as dist

    assert not dist.is_initialized()  # the fake group is gone again


def test_tp_error_in_a_fresh_process_has_no_rank_prefixed_traceback():
    out = subprocess.run(
        [sys.executable, "-m", "fusion_passes", "check", "--tp", "3", "--expect", "router_gemm=4"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 2
    assert out.stderr.splitlines() == [
        "fusion-passes check: error: --tp 3: vocab_size (128) is not divisible by the tensor-parallel world size (3)"
    ]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
def test_device_cuda_without_a_gpu(capsys):
    assert_usage_error(["demo", "--device", "cuda"], "--device cuda: no CUDA device is available", capsys)
    code, out, err = run(["bench", "compile-time", "--device", "cuda"], capsys)
    assert (code, out, err) == (2, "", "bench compile-time: --device cuda: no CUDA device is available\n")


def test_dump_dir_that_cannot_be_written(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert_usage_error(["demo", "--dump-dir", str(blocker / "dumps")], f"--dump-dir {blocker / 'dumps'}: cannot write there", capsys)


def test_bench_errors(capsys):
    assert_usage_error(["bench", "nope"], "no benchmark 'nope'; available: " + ", ".join(available()), capsys)
    code, out, _ = run(["bench"], capsys)
    assert code == 2 and all(name in out for name in available())


@pytest.mark.skipif(torch.cuda.device_count() >= 2, reason="checks the message on a machine with fewer than 2 GPUs")
def test_bench_allreduce_rmsnorm_without_gpus_is_one_line(capsys):
    code, out, err = run(["bench", "allreduce-rmsnorm"], capsys)
    assert code == 2 and err == f"bench allreduce-rmsnorm: needs 2 CUDA GPUs (--nproc), found {torch.cuda.device_count()}\n"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message on a machine without a GPU")
@pytest.mark.parametrize("name", ["router-gemm", "routing", "e2e"])
def test_gpu_benches_without_a_gpu_are_one_line(name, capsys):
    code, out, err = run(["bench", name], capsys)  # e2e's CPU smoke run only when asked: --device cpu
    assert (code, out, err.count("\n")) == (2, "", 1) and "needs a CUDA GPU" in err


def test_check_passes_fails_and_lists_only_what_it_checked(tmp_path, capsys):
    dump = ["--dump-dir", str(tmp_path)]
    code, out, _ = run(["check", *QWEN_TP2, *dump, "--expect", "router_gemm=1,allreduce_rmsnorm=3"], capsys)
    assert (code, out) == (0, "ok: allreduce_rmsnorm=3, router_gemm=1\n")  # in run order, only these two
    code, out, _ = run(["check", *QWEN_TP2, *dump, "--expect", "router_gemm=2"], capsys)
    assert code == 1 and "router_gemm: expected 2, got 1" in out and f"graph dumps: {tmp_path}" in out


def test_check_counts_do_not_depend_on_earlier_compiles_in_the_process(tmp_path, capsys):
    """gpt-oss's norm eps (1e-5) differs from qwen3-moe's (1e-6): had Dynamo carried over
    what it saw, the second compile would take eps as a graph input and the norms would
    not match."""
    dump = ["--dump-dir", str(tmp_path)]
    assert run(["check", "--model", "gpt-oss", "--layers", "1", "--tp", "2", "--no-codegen", *dump,
                "--expect", "allreduce_rmsnorm=3"], capsys)[0] == 0
    code, out, _ = run(["check", *QWEN_TP2, *dump, "--expect", "allreduce_rmsnorm=3"], capsys)
    assert (code, out) == (0, "ok: allreduce_rmsnorm=3\n")


def test_demo_table_and_its_one_dump_dir_per_model(tmp_path, monkeypatch, capsys):
    """Without --dump-dir, every demo of a model reuses (and replaces) the same directory."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    code, first, _ = run(["demo", *QWEN_TP2], capsys)
    assert code == 0
    code, second, _ = run(["demo", *QWEN_TP2, "--disable", "router_gemm,router_routing"], capsys)
    assert code == 0
    dump_dir = cli.default_dump_dir("qwen3-moe")
    assert dump_dir.parent.parent == tmp_path and list(dump_dir.parent.iterdir()) == [dump_dir]
    assert f"graph dumps: {dump_dir}" in first and f"graph dumps: {dump_dir}" in second
    assert second.startswith("qwen3-moe: 1 layer, tp=2, 8 tokens, float32; output (8, 64)\n")
    assert all(line == line.rstrip() for line in second.splitlines())
    rows = {line.split()[0]: line.split()[1:] for line in second.splitlines()[2 : 2 + len(PASS_NAMES)]}
    assert rows["router_gemm"] == ["off", "off"] and rows["router_routing"] == ["off", "off"]
    assert rows["nan_safe_routing"] == ["1", "1"]
    summary = json.loads((dump_dir / "summary.json").read_text())
    assert "router_gemm" not in summary["graphs"][0]["counts"]  # the second demo's, not the first


def test_progress_on_request_only(tmp_path, monkeypatch, capsys):
    argv = ["check", *QWEN_TP2, "--dump-dir", str(tmp_path), "--expect", "router_gemm=1"]
    monkeypatch.delenv(progress.ENV, raising=False)
    code, out, err = run(argv, capsys)
    assert code == 0 and err == ""  # stderr is not a terminal here
    monkeypatch.setenv(progress.ENV, "1")
    code, out, err = run(argv, capsys)
    assert code == 0 and out == "ok: router_gemm=1\n"  # stdout unchanged
    steps = [line.split("] ", 1)[1] for line in err.splitlines()]
    assert steps[0] == "building qwen3-moe (1 layer, tp=2, float32 on cpu)"
    assert "tracing with Dynamo" in steps and any(s.startswith("compiling graph 0 (") for s in steps)
    assert all(line.startswith("fusion-passes check: [") for line in err.splitlines())
    code, _, err = run([*argv, "--no-progress"], capsys)
    assert code == 0 and err == ""


def test_progress_bar_with_and_without_tqdm(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tqdm", None)  # not installed
    with progress.Progress("fusion-passes bench compile-time", True).bar(2, "timing") as advance:
        advance("inductor 1.0 s")
        advance()
    err = capsys.readouterr().err.splitlines()
    assert [line.split("] ", 1)[1] for line in err] == ["timing 1/2: inductor 1.0 s", "timing 2/2"]
    monkeypatch.undo()
    pytest.importorskip("tqdm")
    with progress.Progress("fusion-passes bench compile-time", True).bar(2, "timing") as advance:
        advance("inductor 1.0 s")
    assert "fusion-passes bench compile-time: timing" in capsys.readouterr().err
    with progress.Progress("x", False).bar(2, "timing") as advance:
        advance()
    assert capsys.readouterr().err == ""


def test_progress_setting(monkeypatch):
    monkeypatch.setenv(progress.ENV, "0")
    assert not progress.wanted() and progress.wanted(True)
    monkeypatch.setenv(progress.ENV, "1")
    assert progress.wanted() and not progress.wanted(False)


def test_inspect_errors_name_the_file(tmp_path, capsys):
    assert_usage_error(["inspect", str(tmp_path / "nope")], f"{tmp_path / 'nope'} does not exist or is not a directory", capsys)
    assert_usage_error(["inspect", str(tmp_path)], f"{tmp_path} has no summary.json", capsys)
    summary = tmp_path / "summary.json"
    summary.write_text('{"graphs": [')
    assert_usage_error(["inspect", str(tmp_path)], f"{summary} is not valid JSON", capsys)
    for text in ("{}", "[]", '{"graphs": [{"dir": "graph_000"}]}'):
        summary.write_text(text)
        assert_usage_error(["inspect", str(tmp_path)], f"{summary} is not a fusion_passes summary", capsys)
    summary.write_text('{"graphs": []}')
    assert_usage_error(["inspect", str(tmp_path), "--graph", "0"], "--graph N selects a graph of --pass P's diff; give --pass too", capsys)


def test_help_lists_what_exists(capsys):
    code, out, _ = run(["--help"], capsys)
    assert code == 0 and "``" not in out
    for name in [*available(), *MODELS, *PASS_NAMES]:
        assert name in out
    code, out, _ = run(["bench", "--help"], capsys)
    assert all(f"  {name} " in out for name in available())
    code, out, _ = run(["demo", "--help"], capsys)
    assert "built-in model (default: gpt-oss)" in out and "decoder layers (default: 4)" in out
    code, out, _ = run(["inspect", "--help"], capsys)
    assert "a dump directory" in out
    code, out, _ = run(["build", "--help"], capsys)
    assert "--verbose" in out and "compiler's output" in out

