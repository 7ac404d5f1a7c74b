"""``fusion-passes`` (also ``python -m fusion_passes``): demo, check, inspect, bench, build.

    fusion-passes demo  --model gpt-oss --layers 4 [--tp 2]
    fusion-passes check --model gpt-oss --layers 4 --tp 2 \\
        --expect slice_before_allreduce=4,allreduce_rmsnorm=9,router_gemm=4,nan_safe_routing=4
    fusion-passes inspect DUMP_DIR [--pass router_gemm] [--graph 0]
    fusion-passes bench compile-time|router-gemm|routing [...]
    fusion-passes build            # compile the CUDA kernels ahead of time
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import sys
import tempfile

from .config import PASS_NAMES


def _parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name not in PASS_NAMES or not value.strip().isdigit():
            raise argparse.ArgumentTypeError(f"expected PASS=N with PASS in {list(PASS_NAMES)}, got {item!r}")
        counts[name] = int(value)
    return counts


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import MODELS

    parser.add_argument("--model", default="gpt-oss", choices=sorted(MODELS))
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel world size (fake process group without GPUs)")
    parser.add_argument("--tokens", type=int, default=8, help="tokens in the example batch (marked dynamic)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--disable", default="", help="comma-separated passes to turn off")
    parser.add_argument("--dump-dir", default=None, help="write before/after graphs here (default: a new temp dir)")
    parser.add_argument(
        "--no-codegen",
        action="store_true",
        help="run the passes but not Inductor's code generation: the same counts, much faster",
    )


@contextlib.contextmanager
def _tp_group(world_size: int):
    """The process group for --tp: the real one under torchrun, else a fake one."""
    import torch.distributed as dist

    from .models import fake_tp_group

    if world_size == 1:
        yield None
    elif dist.is_initialized() and dist.get_world_size() == world_size:
        yield dist.group.WORLD
    else:
        with fake_tp_group(world_size) as group:
            yield group


def compile_builtin(args) -> tuple:
    """Compile and run a built-in model with the passes; returns (backend, output, dump dir)."""
    import torch

    from .backend import Backend
    from .config import PassConfig
    from .models import build_model, example_inputs

    disabled = {name.strip() for name in args.disable.split(",") if name.strip()}
    unknown = disabled - set(PASS_NAMES)
    if unknown:
        raise SystemExit(f"--disable: unknown passes {sorted(unknown)}; passes are {list(PASS_NAMES)}")
    dump_dir = args.dump_dir or tempfile.mkdtemp(prefix=f"fusion_passes_{args.model}_")
    config = PassConfig(dump_dir=dump_dir, **{name: False for name in disabled})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    backend = Backend(config, codegen=not args.no_codegen)
    with _tp_group(args.tp) as group, torch.no_grad():
        model = build_model(args.model, args.layers, dtype=getattr(torch, args.dtype), device=device, tp_group=group)
        (input_ids,) = example_inputs(model, args.tokens)
        torch._dynamo.mark_dynamic(input_ids, 0)
        output = torch.compile(model, backend=backend)(input_ids)
    return backend, output, dump_dir


def _demo(args) -> int:
    backend, output, dump_dir = compile_builtin(args)
    tp = f", tp={args.tp}" if args.tp > 1 else ""
    print(f"{args.model}: {args.layers} layers{tp}, {args.tokens} tokens, {args.dtype}; output {tuple(output.shape)}")
    print(backend.report.table())
    print(f"graph dumps: {dump_dir}  (fusion-passes inspect {dump_dir} --pass PASS)")
    return 0


def _check(args) -> int:
    from .testing import count_mismatches

    backend, _, dump_dir = compile_builtin(args)
    mismatches = count_mismatches(backend.report, args.expect)
    if mismatches:
        print("match counts differ from --expect:\n" + "\n".join(mismatches))
        print(backend.report.table())
        print(f"graph dumps: {dump_dir}")
        return 1
    print("ok: " + ", ".join(f"{k}={v}" for k, v in backend.report.counts.items()))
    return 0


def _inspect(args) -> int:
    from . import dump

    try:
        print(dump.describe(args.dir))
        if args.pass_name:
            print(dump.diff(args.dir, args.pass_name, args.graph))
    except (FileNotFoundError, ValueError) as exc:
        print(f"fusion-passes inspect: {exc}", file=sys.stderr)
        return 2
    return 0


def _bench(args) -> int:
    module_name = args.name.replace("-", "_")
    try:
        module = importlib.import_module(f"fusion_passes.bench.{module_name}")
    except ModuleNotFoundError:
        from .bench import available

        print(f"fusion-passes bench: no benchmark {args.name!r}; available: {', '.join(available())}", file=sys.stderr)
        return 2
    return module.main(args.rest)


def _build(args) -> int:
    from . import kernels

    if not kernels.enabled():
        print("fusion-passes build: no CUDA device (or FUSION_PASSES_KERNELS=0); nothing to build", file=sys.stderr)
        return 1
    if kernels.load(verbose=args.verbose):
        print(f"built and loaded {kernels.EXTENSION_NAME} from {kernels.csrc_dir()}")
        return 0
    print(f"fusion-passes build failed: {kernels.load_error()}", file=sys.stderr)
    return 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fusion-passes", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="compile a built-in model and print the match counts")
    _model_arguments(demo)
    demo.set_defaults(run=_demo)

    check = commands.add_parser("check", help="exit 1 if the match counts differ from --expect")
    _model_arguments(check)
    check.add_argument("--expect", type=_parse_counts, required=True, help="PASS=N,PASS=N,...")
    check.set_defaults(run=_check)

    inspect = commands.add_parser("inspect", help="read a dump directory")
    inspect.add_argument("dir")
    inspect.add_argument("--pass", dest="pass_name", choices=PASS_NAMES, help="show this pass's before/after diff")
    inspect.add_argument("--graph", type=int, default=None, help="only graph N's diff, numbered as in the table")
    inspect.set_defaults(run=_inspect)

    bench = commands.add_parser("bench", help="run a benchmark (fusion_passes/bench/NAME.py)")
    bench.add_argument("name")
    bench.add_argument("rest", nargs=argparse.REMAINDER)
    bench.set_defaults(run=_bench)

    build = commands.add_parser("build", help="compile the CUDA kernels now (otherwise: on first use)")
    build.add_argument("--verbose", action="store_true")
    build.set_defaults(run=_build)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except BrokenPipeError:  # e.g. `fusion-passes inspect DIR | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
