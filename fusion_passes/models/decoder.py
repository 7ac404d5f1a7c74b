"""The decoder model shared by every built-in config, and its constructors."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from .config import MODELS, ModelConfig
from .layers import Attention, SwiGLUMLP, VocabParallelEmbedding, WeightInit, make_norm
from .moe import MoE
from .tp import TensorParallel


class DecoderLayer(nn.Module):
    """Pre-norm block: h += attn(input_norm(h)); h += mlp(post_attn_norm(h)).

    Under TP, attn and mlp end in an all-reduce, so each all-reduce is followed by
    a residual add and an RMSNorm (the pattern the TP fusion passes rewrite).
    """

    def __init__(self, cfg: ModelConfig, init: WeightInit, parallel: TensorParallel):
        super().__init__()
        self.input_norm = make_norm(cfg, init)
        self.attn = Attention(cfg, init, parallel)
        self.post_attn_norm = make_norm(cfg, init)
        if cfg.moe is not None:
            self.mlp: nn.Module = MoE(cfg, init, parallel)
        else:
            self.mlp = SwiGLUMLP(cfg.hidden_size, cfg.intermediate_size, init, parallel)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        residual = h
        x = self.attn(self.input_norm(h))
        h = residual + x
        residual = h
        x = self.mlp(self.post_attn_norm(h))
        return residual + x


class TinyDecoder(nn.Module):
    """Token-flattened decoder: input_ids [T] -> final-normed hidden states [T, H].

    `tp_group` (a ProcessGroup, or None for a single device) switches on tensor
    parallelism over its ranks; the weights are then this rank's shards of the
    single-device weights for the same `seed`. No lm_head.
    """

    def __init__(
        self,
        cfg: ModelConfig,
        num_layers: int,
        *,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str = "cpu",
        tp_group: dist.ProcessGroup | None = None,
        seed: int = 0,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        init = WeightInit(seed, dtype, device)
        parallel = TensorParallel.from_group(tp_group)
        self.config = cfg
        self.num_layers = num_layers
        self.tp_group = tp_group
        self.tp_world_size = parallel.world_size
        self.embed = VocabParallelEmbedding(cfg, init, parallel)
        self.layers = nn.ModuleList(DecoderLayer(cfg, init, parallel) for _ in range(num_layers))
        self.final_norm = make_norm(cfg, init)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids)
        for layer in self.layers:
            h = layer(h)
        return self.final_norm(h)

    @property
    def num_all_reduces(self) -> int:
        """All-reduces per forward: embedding + 2 per layer under TP, else none."""
        return 2 * self.num_layers + 1 if self.tp_group is not None else 0


def build_model(
    name: str,
    layers: int,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    tp_group: dist.ProcessGroup | None = None,
    seed: int = 0,
) -> TinyDecoder:
    """Build the registered model `name` (a key of MODELS) with `layers` decoder layers."""
    try:
        cfg = MODELS[name]
    except KeyError:
        raise KeyError(f"unknown model {name!r}; known models: {sorted(MODELS)}") from None
    return TinyDecoder(cfg, layers, dtype=dtype, device=device, tp_group=tp_group, seed=seed)


def example_inputs(model: TinyDecoder, num_tokens: int, *, seed: int = 0) -> tuple[torch.Tensor]:
    """Deterministic `(input_ids,)` of `num_tokens` token ids for `model`."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, model.config.vocab_size, (num_tokens,), generator=generator)
    return (ids.to(model.embed.weight.device),)
