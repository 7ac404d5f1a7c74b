"""Configs of the built-in tiny decoder models and the registry that names them.

The sizes are tiny so CPU compiles stay fast, but every config keeps the structure
of the real model it is named after (norm form, router, routing arithmetic, shared
expert, padded MoE output), because that structure is what graph passes match.

Head counts and intermediate sizes are multiples of 8 so tensor parallelism works
at world sizes 2, 4 and 8 (key/value heads may be fewer: they are replicated).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

NormKind = Literal["hf", "gpt_oss", "functional"]
RoutingKind = Literal["topk_softmax", "softmax_topk", "sigmoid_bias"]
SoftmaxUpcast = Literal["dtype_arg", "float_call"]
ExpertCompute = Literal["dense", "grouped"]

NORM_KINDS = ("hf", "gpt_oss", "functional")
ROUTING_KINDS = ("topk_softmax", "softmax_topk", "sigmoid_bias")
SOFTMAX_UPCASTS = ("dtype_arg", "float_call")
EXPERT_COMPUTES = ("dense", "grouped")


@dataclasses.dataclass(frozen=True)
class MoEConfig:
    """A routed mixture-of-experts block of SwiGLU experts.

    routing:
      "topk_softmax"  gpt-oss: top-k of the logits, softmax over the k picked.
      "softmax_topk"  Qwen3-MoE / Mixtral: softmax over all experts in fp32, top-k,
                      optionally renormalised to sum to 1.
      "sigmoid_bias"  DeepSeek-V3: sigmoid scores, top-k of score +
                      e_score_correction_bias (within the topk_group best of n_group
                      expert groups), weights are the unbiased scores, renormalised
                      and scaled by routed_scaling_factor.
    """

    num_experts: int
    top_k: int
    intermediate_size: int  # of each expert
    routing: RoutingKind
    router_bias: bool = False
    # "softmax_topk" only: divide the top-k probabilities by their sum.
    renormalize: bool = True
    # "softmax_topk" only: how logits reach fp32. "dtype_arg" is Qwen3-MoE's
    # softmax(logits, dtype=torch.float); "float_call" is Mixtral's softmax(logits.float()).
    softmax_upcast: SoftmaxUpcast = "dtype_arg"
    # "sigmoid_bias" only.
    routed_scaling_factor: float = 1.0
    # "sigmoid_bias" only: group-limited selection (n_group=1: every expert is a candidate).
    n_group: int = 1
    topk_group: int = 1
    # Intermediate size of an always-on dense expert added to the output (0: none).
    shared_expert_intermediate_size: int = 0
    # The experts' down projection writes hidden_size rounded up to this multiple
    # (zero-padded weights) and the block slices back afterwards, as gpt-oss does.
    output_pad_multiple: int = 1
    # How the experts run: "dense" computes every expert for every token (tiny models,
    # any torch); "grouped" sorts the token copies by expert and runs one grouped GEMM
    # per projection (torch._grouped_mm), as serving engines do.
    expert_compute: ExpertCompute = "dense"

    def __post_init__(self) -> None:
        if self.routing not in ROUTING_KINDS:
            raise ValueError(f"routing must be one of {ROUTING_KINDS}, got {self.routing!r}")
        if self.softmax_upcast not in SOFTMAX_UPCASTS:
            raise ValueError(
                f"softmax_upcast must be one of {SOFTMAX_UPCASTS}, got {self.softmax_upcast!r}"
            )
        if self.expert_compute not in EXPERT_COMPUTES:
            raise ValueError(f"expert_compute must be one of {EXPERT_COMPUTES}, got {self.expert_compute!r}")
        if not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k={self.top_k} must be in [1, num_experts={self.num_experts}]")
        if self.n_group < 1 or self.num_experts % self.n_group:
            raise ValueError(f"n_group={self.n_group} must be >= 1 and divide num_experts={self.num_experts}")
        if not 1 <= self.topk_group <= self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be in [1, n_group={self.n_group}]")
        if self.top_k > self.topk_group * (self.num_experts // self.n_group):
            raise ValueError(f"top_k={self.top_k} exceeds the experts of topk_group={self.topk_group} groups")
        if self.n_group > 1 and self.routing != "sigmoid_bias":
            raise ValueError(f"expert groups need routing='sigmoid_bias', got {self.routing!r}")
        if self.shared_expert_intermediate_size and self.output_pad_multiple > 1:
            raise ValueError("a shared expert together with a padded MoE output is not supported")

    def padded_size(self, hidden_size: int) -> int:
        """Width of the experts' (possibly padded) output."""
        multiple = self.output_pad_multiple
        return -(-hidden_size // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A pre-norm decoder; `moe=None` means every layer has a dense SwiGLU MLP."""

    name: str
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int = 128
    norm: NormKind = "hf"
    norm_eps: float = 1e-6
    intermediate_size: int = 128  # of the dense MLP; unused when moe is set
    moe: MoEConfig | None = None

    def __post_init__(self) -> None:
        if self.norm not in NORM_KINDS:
            raise ValueError(f"norm must be one of {NORM_KINDS}, got {self.norm!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}"
            )


MODELS: dict[str, ModelConfig] = {
    cfg.name: cfg
    for cfg in (
        ModelConfig(
            name="gpt-oss",
            hidden_size=80,  # not a multiple of 256, so the padded MoE output matters
            num_heads=8,
            num_kv_heads=2,
            head_dim=16,
            norm="gpt_oss",
            norm_eps=1e-5,
            moe=MoEConfig(
                num_experts=8,
                top_k=4,
                intermediate_size=32,
                routing="topk_softmax",
                router_bias=True,
                output_pad_multiple=256,
            ),
        ),
        ModelConfig(
            name="qwen3-moe",
            hidden_size=64,
            num_heads=8,
            num_kv_heads=4,
            head_dim=16,
            norm="hf",
            moe=MoEConfig(
                num_experts=16,
                top_k=4,
                intermediate_size=32,
                routing="softmax_topk",
                renormalize=True,
                softmax_upcast="dtype_arg",
            ),
        ),
        ModelConfig(
            name="mixtral",
            hidden_size=64,
            num_heads=8,
            num_kv_heads=4,
            head_dim=16,
            norm="functional",
            norm_eps=1e-5,
            moe=MoEConfig(
                num_experts=8,
                top_k=2,
                intermediate_size=32,
                routing="softmax_topk",
                renormalize=True,
                softmax_upcast="float_call",
            ),
        ),
        ModelConfig(
            name="deepseek-v3",
            hidden_size=64,
            num_heads=8,
            num_kv_heads=8,
            head_dim=16,
            norm="hf",
            moe=MoEConfig(  # DeepSeek-V3: 256 experts in 8 groups, the best 4 groups kept, top-8
                num_experts=32,
                top_k=4,
                intermediate_size=32,
                routing="sigmoid_bias",
                routed_scaling_factor=2.5,
                n_group=8,
                topk_group=4,
                shared_expert_intermediate_size=32,
            ),
        ),
        ModelConfig(
            name="llama",
            hidden_size=64,
            num_heads=8,
            num_kv_heads=4,
            head_dim=16,
            norm="hf",
            norm_eps=1e-5,
            intermediate_size=128,
        ),
    )
}
