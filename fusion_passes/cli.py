"""fusion-passes (also python -m fusion_passes): demo, check, inspect, bench, build.

    fusion-passes demo  --model gpt-oss --layers 4 [--tp 2]
    fusion-passes check --model gpt-oss --layers 4 --tp 2 \\
        --expect slice_before_allreduce=4,allreduce_rmsnorm=9,router_gemm=4,nan_safe_routing=4
    fusion-passes inspect DUMP_DIR [--pass router_gemm] [--graph 0]
    fusion-passes bench NAME [...]     # fusion-passes bench --help lists them
    fusion-passes build                # compile the CUDA kernels ahead of time

Bad arguments print one line and exit with status 2; a check whose counts differ exits 1.
"""

from __future__ import annotations

import argparse
import contextlib
import getpass
import importlib
import sys
import tempfile
import time
from pathlib import Path

from . import progress
from .config import PASS_NAMES


class UsageError(Exception):
    """A bad argument found after parsing: printed as one line, exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    def error(self, message: str):
        """One line (argparse prints the whole usage first), exit status 2."""
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    def _get_help_string(self, action):
        """The default after the help, where there is one to show."""
        if action.default in (None, False, set()) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def at_least(low: int):
    """An argparse type: an integer >= low, else one line naming the argument."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"expected an integer >= {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def _parse_counts(text: str) -> dict[str, int]:
    counts = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = (part.strip() for part in item.partition("="))
        if not sep or name not in PASS_NAMES or not value.isdigit():
            raise argparse.ArgumentTypeError(f"expected PASS=N with PASS in {list(PASS_NAMES)}, got {item!r}")
        if name in counts:
            raise argparse.ArgumentTypeError(f"{name} is given twice")
        counts[name] = int(value)
    if not counts:
        raise argparse.ArgumentTypeError("expected at least one PASS=N; an empty --expect would check nothing")
    return counts


def _parse_passes(text: str) -> set[str]:
    names = {name.strip() for name in text.split(",") if name.strip()}
    unknown = sorted(names - set(PASS_NAMES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown passes {unknown}; passes are {list(PASS_NAMES)}")
    return names


def _model_arguments(parser: argparse.ArgumentParser) -> None:
    from .models import MODELS

    parser.add_argument("--model", default="gpt-oss", choices=list(MODELS), help="built-in model")
    parser.add_argument("--layers", type=at_least(1), default=4, help="decoder layers")
    parser.add_argument("--tp", type=at_least(1), default=1, help="tensor-parallel world size (fake process group without GPUs)")
    parser.add_argument("--tokens", type=at_least(1), default=8, help="tokens in the example batch (marked dynamic)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"], help="model dtype")
    parser.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available, else cpu")
    parser.add_argument("--disable", type=_parse_passes, default=set(), metavar="PASS,...", help="passes to turn off")
    parser.add_argument(
        "--dump-dir",
        default=None,
        help="write before/after graphs here (default: one directory per model under the temp dir, "
        "replaced by the next run)",
    )
    parser.add_argument(
        "--no-codegen",
        action="store_true",
        help="run the passes but not Inductor's lowering, code generation and C++/Triton compile: "
        "the same counts; Dynamo, AOT autograd and the passes still run",
    )
    _progress_argument(parser)


def _progress_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help=f"steps on stderr (default: when stderr is a terminal, or ${progress.ENV}=1)",
    )


def default_dump_dir(model: str) -> Path:
    """Where demo and check dump without --dump-dir: one directory per user and model,
    which the next run for the same model replaces."""
    return Path(tempfile.gettempdir()) / f"fusion_passes_{getpass.getuser()}" / model


def _writable_dir(path: Path) -> Path:
    try:
        path.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as exc:
        raise UsageError(f"--dump-dir {path}: cannot write there ({exc.strerror or exc})") from None
    return path


def _device(requested: str | None) -> str:
    import torch

    if requested == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda: no CUDA device is available (torch.cuda.is_available() is False)")
    return requested or ("cuda" if torch.cuda.is_available() else "cpu")


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


def _with_progress(backend, steps: progress.Progress):
    """``backend`` as a torch.compile backend that reports each graph it compiles."""

    def compile_graph(gm, example_inputs):
        index = len(backend.report.graphs)
        nodes = len(gm.graph.nodes)
        steps.step(f"compiling graph {index} ({nodes} FX nodes): AOT autograd, the passes, Inductor")
        start = time.perf_counter()
        compiled = backend(gm, example_inputs)
        steps.step(f"compiled graph {index} in {time.perf_counter() - start:.1f} s")
        return compiled

    return compile_graph


def compile_builtin(args) -> tuple:
    """Compile and run a built-in model with the passes; returns (backend, output, dump dir)."""
    device = _device(args.device)
    dump_dir = _writable_dir(Path(args.dump_dir) if args.dump_dir else default_dump_dir(args.model))

    import torch

    from .backend import Backend
    from .config import PassConfig
    from .models import build_model, example_inputs

    steps = progress.Progress(f"fusion-passes {args.command}", progress.wanted(args.progress))
    config = PassConfig(dump_dir=str(dump_dir), **{name: False for name in args.disable})
    backend = Backend(config, codegen=not args.no_codegen)
    with _tp_group(args.tp) as group, torch.no_grad():
        steps.step(f"building {args.model} ({_layers(args.layers)}, tp={args.tp}, {args.dtype} on {device})")
        try:
            model = build_model(args.model, args.layers, dtype=getattr(torch, args.dtype), device=device, tp_group=group)
        except ValueError as exc:  # a world size that does not divide the model's sizes
            raise UsageError(f"--tp {args.tp}: {exc}") from None
        (input_ids,) = example_inputs(model, args.tokens)
        torch._dynamo.mark_dynamic(input_ids, 0)
        steps.step("tracing with Dynamo")
        # What Dynamo learned from earlier compiles in this process (e.g. a float it saw
        # change, such as another model's norm eps, made a graph input) must not change
        # this graph's counts.
        torch._dynamo.reset()
        output = torch.compile(model, backend=_with_progress(backend, steps))(input_ids)
        steps.step(f"ran the compiled model: output {tuple(output.shape)}")
    return backend, output, dump_dir


def _layers(count: int) -> str:
    return f"{count} layer" + ("" if count == 1 else "s")


def _demo(args) -> int:
    backend, output, dump_dir = compile_builtin(args)
    tp = f", tp={args.tp}" if args.tp > 1 else ""
    print(f"{args.model}: {_layers(args.layers)}{tp}, {args.tokens} tokens, {args.dtype}; output {tuple(output.shape)}")
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
    counts = backend.report.counts
    print("ok: " + ", ".join(f"{name}={counts[name]}" for name in PASS_NAMES if name in args.expect))
    return 0


def _inspect(args) -> int:
    from . import dump

    if args.graph is not None and not args.pass_name:
        raise UsageError("--graph N selects a graph of --pass P's diff; give --pass too")
    try:
        print(dump.describe(args.dir))
        if args.pass_name:
            print(dump.diff(args.dir, args.pass_name, args.graph), end="")  # it ends its last line
    except (FileNotFoundError, ValueError) as exc:
        raise UsageError(str(exc)) from None
    return 0


def _bench(args) -> int:
    from .bench import available

    if args.name is None:
        args.parser.print_help()
        return 2
    if args.name not in available():
        raise UsageError(f"no benchmark {args.name!r}; available: {', '.join(available())}")
    module = importlib.import_module(f"fusion_passes.bench.{args.name.replace('-', '_')}")
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


def _bench_list() -> str:
    from .bench import describe

    return "benchmarks:\n" + "\n".join(f"  {name:<20} {summary}" for name, summary in describe())


def build_parser() -> argparse.ArgumentParser:
    from .models import MODELS

    parser = OneLineParser(
        prog="fusion-passes",
        description=__doc__,
        epilog=f"built-in models: {', '.join(MODELS)}\npasses: {', '.join(PASS_NAMES)}\n{_bench_list()}",
        formatter_class=HelpFormatter,
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, summary: str, run, **kwargs) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=summary, description=summary, formatter_class=HelpFormatter, **kwargs)
        sub.set_defaults(run=run, parser=sub)
        return sub

    demo = command("demo", "compile a built-in model and print the match counts", _demo)
    _model_arguments(demo)

    check = command("check", "compile a built-in model; exit 1 if the match counts differ from --expect", _check)
    _model_arguments(check)
    check.add_argument(
        "--expect", type=_parse_counts, required=True, metavar="PASS=N,...", help="the counts to check (only these passes)"
    )

    inspect = command("inspect", "read a dump directory: the counts, and a pass's before/after diff", _inspect)
    inspect.add_argument("dir", help="a dump directory (--dump-dir, PassConfig.dump_dir or FUSION_PASSES_DUMP_DIR)")
    inspect.add_argument("--pass", dest="pass_name", choices=PASS_NAMES, help="show this pass's before/after diff")
    inspect.add_argument("--graph", type=at_least(0), default=None, help="only graph N's diff, numbered as in the table")

    bench = command("bench", "run a benchmark (fusion_passes/bench/NAME.py)", _bench, epilog=_bench_list())
    bench.add_argument("name", nargs="?", metavar="NAME", help="one of the benchmarks below")
    bench.add_argument("rest", nargs=argparse.REMAINDER, help="the benchmark's own arguments (NAME --help)")

    build = command("build", "compile the CUDA kernels now (otherwise: on first use)", _build)
    build.add_argument("--verbose", action="store_true", help="show the compiler's output")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except UsageError as exc:
        print(f"{args.parser.prog}: error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # e.g. `fusion-passes inspect DIR | head`
        sys.stderr.close()
        return 0


if __name__ == "__main__":
    sys.exit(main())
