"""PassConfig: what the pass manager does, and the part of it that keys Inductor's cache."""

from __future__ import annotations

import dataclasses
import functools
import os
import types
import typing
from collections.abc import Mapping

PASS_NAMES = ("slice_before_allreduce", "allreduce_rmsnorm", "router_gemm", "nan_safe_routing", "router_routing")


@dataclasses.dataclass(frozen=True)
class PassConfig:
    """One switch per pass (all on by default) and the knobs the passes read.

    Every field except ``dump_dir`` changes the compiled result and is hashed into the
    pass manager's ``uuid()``, so Inductor's FX-graph cache never serves a graph that
    was compiled under another configuration. While dumping, the cache is bypassed
    (a cache hit would run no pass, so nothing would be dumped).

    Each field is checked at construction against its annotation (a bool field takes
    only a bool, an int field no bool or float, a tuple field no str), and the ranges and
    op names below are checked too: a ValueError names the field, the value and what it
    must be.
    """

    slice_before_allreduce: bool = True
    allreduce_rmsnorm: bool = True
    router_gemm: bool = True
    nan_safe_routing: bool = True
    router_routing: bool = True
    # Largest expert count (router outputs / routing width) the router and routing
    # passes treat as MoE routing; wider top-k (e.g. a sampler over a vocabulary) is
    # left alone.
    max_experts: int = 512
    # nan_safe_routing also matches routing that ranks probabilities rounded to bf16/fp16
    # (a softmax or sigmoid computed in the model's dtype: DBRX, Mistral 4, ZAYA and bf16
    # sigmoid routers, served in bf16); the op ranks them unrounded, in fp32, as serving
    # engines' routing kernels do. Where the rounding makes scores tie or swap, it may choose
    # other experts than eager; False leaves such routing alone
    # (docs/passes/nan_safe_routing.md, "Probabilities rounded to bf16/fp16").
    upcast_low_precision_routing: bool = True
    # Token count up to which fusion_passes::router_gemm uses its own kernel instead of
    # cuBLAS; None keeps the kernel's measured default. Applied process-wide when a
    # graph compiled under this config is installed.
    router_gemm_max_tokens: int | None = None
    # Token count the fused all-reduce's symmetric-memory workspace is sized for, per process
    # group (rows of up to 16 KiB, two regions, two halves); None keeps the default (512).
    # Larger inputs take the NCCL path. Applied when a graph compiled under this config is
    # installed, to workspaces allocated after that.
    allreduce_max_tokens: int | None = None
    # Extra all-reduce ops to recognise, as qualified names "namespace::op" with the
    # schema (Tensor x, str group_name) -> Tensor (a serving engine's own all-reduce).
    allreduce_ops: tuple[str, ...] = ()
    # Where to write before/after graph dumps; FUSION_PASSES_DUMP_DIR if unset.
    dump_dir: str | None = None

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = _checked(field.name, getattr(self, field.name), _field_types()[field.name])
            object.__setattr__(self, field.name, value)
        _at_least("max_experts", self.max_experts, 1)
        _at_least("router_gemm_max_tokens", self.router_gemm_max_tokens, 0)
        _at_least("allreduce_max_tokens", self.allreduce_max_tokens, 1)
        for name in self.allreduce_ops:
            _check_allreduce_op(name)

    @classmethod
    def coerce(cls, config) -> PassConfig:
        """``config`` as a PassConfig: a PassConfig, None (the defaults), or a mapping of
        field names to values (``{"router_gemm": False}``)."""
        if config is None:
            return cls()
        if isinstance(config, cls):
            return config
        if isinstance(config, Mapping):
            fields = [field.name for field in dataclasses.fields(cls)]
            unknown = sorted(str(key) for key in config if key not in fields)
            if unknown:
                raise ValueError(f"unknown PassConfig fields {unknown}; the fields are {fields}")
            return cls(**config)
        raise ValueError(
            f"expected a PassConfig, None or a mapping of PassConfig fields, got {type(config).__name__} {config!r}"
        )

    def enabled_passes(self) -> tuple[str, ...]:
        return tuple(name for name in PASS_NAMES if getattr(self, name))

    def resolved_dump_dir(self) -> str | None:
        return self.dump_dir or os.environ.get("FUSION_PASSES_DUMP_DIR") or None

    def cache_key(self) -> dict:
        """The fields that change the compiled result (everything but where dumps go)."""
        key = dataclasses.asdict(self)
        key.pop("dump_dir")
        return key


@functools.cache
def _field_types() -> dict[str, object]:
    return typing.get_type_hints(PassConfig)


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    if typing.get_origin(hint) is tuple:
        return f"a tuple of {typing.get_args(hint)[0].__name__}"
    if hint is str:
        return "a str or path"
    return f"an {hint.__name__}" if hint.__name__[0] in "aeiou" else f"a {hint.__name__}"


def _checked(name: str, value, hint):
    """``value`` if it has the type ``hint``, the field ``name``'s annotation (a list for
    a tuple becomes a tuple); a ValueError naming the field otherwise. A bool is not an
    int here, and a str is not a tuple of str (it would be read character by character)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        (hint,) = [option for option in options if option is not type(None)]
        origin = typing.get_origin(hint)
    if origin is tuple:
        (item,) = [arg for arg in typing.get_args(hint) if arg is not Ellipsis]
        if isinstance(value, (tuple, list)) and all(isinstance(entry, item) for entry in value):
            return tuple(value)
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is str:
        if isinstance(value, (str, os.PathLike)):
            return os.fspath(value)  # a pathlib.Path for dump_dir
    elif isinstance(hint, type):
        if isinstance(value, hint):
            return value
    else:
        raise TypeError(f"PassConfig.{name}: no check for the annotation {hint!r}")
    raise ValueError(f"PassConfig.{name} must be {_describe(_field_types()[name])}, got {value!r}")


def _at_least(name: str, value: int | None, low: int) -> None:
    if value is not None and value < low:
        raise ValueError(f"PassConfig.{name} must be >= {low}, got {value}")


def _check_allreduce_op(qualified: str) -> None:
    """An ``allreduce_ops`` entry names a registered op ``(Tensor x, str group_name) -> Tensor``."""
    import torch

    namespace, sep, name = qualified.partition("::")
    if not sep or not namespace or not name or "::" in name:
        raise ValueError(f"PassConfig.allreduce_ops entries look like 'namespace::op', got {qualified!r}")
    try:
        schema = getattr(getattr(torch.ops, namespace), name).default._schema
    except (AttributeError, RuntimeError):
        raise ValueError(f"PassConfig.allreduce_ops names {qualified!r}, which is not a registered op") from None
    arguments = [str(argument.type) for argument in schema.arguments]
    returns = [str(ret.type) for ret in schema.returns]
    if arguments != ["Tensor", "str"] or returns != ["Tensor"]:
        raise ValueError(
            f"PassConfig.allreduce_ops names {qualified!r}, whose schema is {schema}; an all-reduce op "
            "must be (Tensor x, str group_name) -> Tensor"
        )
