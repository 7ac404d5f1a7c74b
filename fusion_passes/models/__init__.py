"""Tiny built-in transformer decoders with the structure of real models.

They keep the graph structure (norm forms, MoE routers and routing arithmetic,
tensor-parallel all-reduce + residual + RMSNorm) that the fusion passes match,
at sizes small enough to compile quickly on CPU.

    model = build_model("qwen3-moe", layers=2)
    out = model(*example_inputs(model, num_tokens=5))        # [5, hidden]

    with fake_tp_group(world_size=4) as group:               # trace TP on one CPU
        tp_model = build_model("gpt-oss", 2, tp_group=group)
        torch.compile(tp_model)(*example_inputs(tp_model, 5))
"""

from .config import MODELS, ModelConfig, MoEConfig
from .decoder import DecoderLayer, TinyDecoder, build_model, example_inputs
from .tp import TensorParallel, all_reduce, fake_tp_group

__all__ = [
    "MODELS",
    "DecoderLayer",
    "MoEConfig",
    "ModelConfig",
    "TensorParallel",
    "TinyDecoder",
    "all_reduce",
    "build_model",
    "example_inputs",
    "fake_tp_group",
]
