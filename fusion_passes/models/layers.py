"""Building blocks of the built-in decoders: weight init, RMSNorms, embedding,
attention and the dense SwiGLU MLP. Every block is tensor-parallel aware.

Tensors are token-flattened ([T, hidden]); all T tokens form one causal sequence.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import tp
from .config import ModelConfig
from .tp import TensorParallel


class WeightInit:
    """Draws deterministic random weights from one seeded generator.

    Every weight is drawn full-size, in construction order, whatever the
    tensor-parallel layout, and only then sharded: so a tensor-parallel model
    holds exact slices of the single-device model built with the same seed.
    """

    def __init__(self, seed: int, dtype: torch.dtype, device: torch.device | str):
        self.dtype = dtype
        self.device = torch.device(device)
        # Drawn where the model lives: full-size weights of real model shapes would take
        # minutes to draw on a CPU. Same seed and device type, same weights.
        self._generator = torch.Generator(self.device).manual_seed(seed)

    def normal(self, *shape: int, std: float, mean: float = 0.0) -> torch.Tensor:
        """A full-size fp32 tensor; convert with `param`/`buffer`/`linear`."""
        return torch.randn(shape, generator=self._generator, device=self.device) * std + mean

    def param(self, value: torch.Tensor, dtype: torch.dtype | None = None) -> nn.Parameter:
        # Inference-only models: no autograd, so compiles produce inference graphs.
        return nn.Parameter(
            value.to(device=self.device, dtype=dtype or self.dtype), requires_grad=False
        )

    def buffer(self, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        return value.to(device=self.device, dtype=dtype)

    def linear(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
        """An nn.Linear holding `weight` ([out, in]) and optional `bias`."""
        out_features, in_features = weight.shape
        layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")
        layer.weight = self.param(weight)
        if bias is not None:
            layer.bias = self.param(bias)
        return layer


def fan_in_normal(init: WeightInit, out_features: int, in_features: int) -> torch.Tensor:
    # std 1/sqrt(fan_in) keeps activations O(1), so numerical comparisons
    # (compiled vs eager, TP vs single device) are not dominated by tiny values.
    return init.normal(out_features, in_features, std=in_features**-0.5)


# --------------------------------------------------------------------------- norms


class _RMSNorm(nn.Module):
    """Shared state of the RMSNorm forms; subclasses differ only in the arithmetic."""

    # dtype of the weight; None means the model dtype.
    weight_dtype: torch.dtype | None = None

    def __init__(self, hidden_size: int, eps: float, init: WeightInit):
        super().__init__()
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = init.param(init.normal(hidden_size, std=0.02, mean=1.0), self.weight_dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}"


class HFRMSNorm(_RMSNorm):
    """Llama / Qwen / DeepSeek / Mixtral HuggingFace form: normalise in fp32, scale in the input dtype."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        input_dtype = x.dtype
        h = x.to(torch.float32)
        variance = h.pow(2).mean(-1, keepdim=True)
        h = h * torch.rsqrt(variance + self.eps)
        return self.weight * h.to(input_dtype)


class GptOssRMSNorm(_RMSNorm):
    """gpt-oss form: fp32 weight, scale in fp32, cast back last."""

    weight_dtype = torch.float32

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = x.float()
        t = t * torch.rsqrt(torch.mean(t**2, dim=-1, keepdim=True) + self.eps)
        return (t * self.weight).to(x.dtype)


class FunctionalRMSNorm(_RMSNorm):
    """torch.nn.functional.rms_norm (a single aten op before decomposition)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), self.weight, self.eps)


RMS_NORMS: dict[str, type[_RMSNorm]] = {
    "hf": HFRMSNorm,
    "gpt_oss": GptOssRMSNorm,
    "functional": FunctionalRMSNorm,
}


def make_norm(cfg: ModelConfig, init: WeightInit) -> _RMSNorm:
    return RMS_NORMS[cfg.norm](cfg.hidden_size, cfg.norm_eps, init)


# ---------------------------------------------------------------- embedding


class VocabParallelEmbedding(nn.Module):
    """Token embedding; under TP each rank holds vocab_size / W rows.

    Ids outside this rank's rows look up row 0 and are zeroed, so the all-reduce
    of the partial embeddings yields the full lookup.
    """

    def __init__(self, cfg: ModelConfig, init: WeightInit, parallel: TensorParallel):
        super().__init__()
        full = init.normal(cfg.vocab_size, cfg.hidden_size, std=1.0)
        self.weight = init.param(parallel.split(full, 0, "vocab_size"))
        self.num_local_rows = self.weight.shape[0]
        self.vocab_start = parallel.rank * self.num_local_rows
        self.tp_group = parallel.group

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_group is None:
            return F.embedding(input_ids, self.weight)
        local_ids = input_ids - self.vocab_start
        outside = (local_ids < 0) | (local_ids >= self.num_local_rows)
        local_ids = local_ids.masked_fill(outside, 0)
        partial = F.embedding(local_ids, self.weight).masked_fill(outside.unsqueeze(-1), 0)
        return tp.all_reduce(partial, self.tp_group)


# ---------------------------------------------------------------- attention


class Attention(nn.Module):
    """Causal self-attention over all tokens as one sequence (no RoPE, no KV cache).

    Under TP, q/k/v are column-parallel (whole heads per rank; key/value heads
    replicated when fewer than ranks) and o_proj is row-parallel, followed by an
    all-reduce of the [T, hidden] output.
    """

    def __init__(self, cfg: ModelConfig, init: WeightInit, parallel: TensorParallel):
        super().__init__()
        hidden, head_dim = cfg.hidden_size, cfg.head_dim
        q_size, kv_size = cfg.num_heads * head_dim, cfg.num_kv_heads * head_dim
        q = fan_in_normal(init, q_size, hidden)
        k = fan_in_normal(init, kv_size, hidden)
        v = fan_in_normal(init, kv_size, hidden)
        o = fan_in_normal(init, hidden, q_size)

        self.head_dim = head_dim
        self.num_local_heads = parallel.num_local_heads(cfg.num_heads)
        self.num_local_kv_heads = parallel.num_local_heads(cfg.num_kv_heads, replicate=True)
        self.q_proj = init.linear(parallel.split_heads(q, cfg.num_heads))
        self.k_proj = init.linear(parallel.split_heads(k, cfg.num_kv_heads, replicate=True))
        self.v_proj = init.linear(parallel.split_heads(v, cfg.num_kv_heads, replicate=True))
        self.o_proj = init.linear(parallel.split(o, 1, "o_proj input features"))
        self.tp_group = parallel.group

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # [T, heads * head_dim] -> [heads, T, head_dim]
        q = self.q_proj(x).view(-1, self.num_local_heads, self.head_dim).transpose(0, 1)
        k = self.k_proj(x).view(-1, self.num_local_kv_heads, self.head_dim).transpose(0, 1)
        v = self.v_proj(x).view(-1, self.num_local_kv_heads, self.head_dim).transpose(0, 1)
        queries_per_kv = self.num_local_heads // self.num_local_kv_heads
        if queries_per_kv > 1:  # grouped-query attention
            k = k.repeat_interleave(queries_per_kv, dim=0)
            v = v.repeat_interleave(queries_per_kv, dim=0)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        out = self.o_proj(out.transpose(0, 1).flatten(1))
        if self.tp_group is not None:
            out = tp.all_reduce(out, self.tp_group)
        return out


# ---------------------------------------------------------------- dense MLP


class SwiGLUMLP(nn.Module):
    """down(silu(gate(x)) * up(x)); gate/up column-parallel, down row-parallel under TP.

    `reduce_output=False` leaves the partial sum un-reduced for a caller that adds
    it to other partial sums before a single all-reduce (a MoE shared expert).
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        init: WeightInit,
        parallel: TensorParallel,
        *,
        reduce_output: bool = True,
    ):
        super().__init__()
        gate = fan_in_normal(init, intermediate_size, hidden_size)
        up = fan_in_normal(init, intermediate_size, hidden_size)
        down = fan_in_normal(init, hidden_size, intermediate_size)
        self.gate_proj = init.linear(parallel.split(gate, 0, "MLP intermediate_size"))
        self.up_proj = init.linear(parallel.split(up, 0, "MLP intermediate_size"))
        self.down_proj = init.linear(parallel.split(down, 1, "MLP intermediate_size"))
        self.reduce_group = parallel.group if reduce_output else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
        if self.reduce_group is not None:
            out = tp.all_reduce(out, self.reduce_group)
        return out
