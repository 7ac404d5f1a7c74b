"""The mixture-of-experts block: router, the three routing variants, experts.

Routing functions reproduce the reference models' arithmetic op for op (dtypes
and casts included), since that is what router/routing fusion passes match.
Experts run densely, every token through every expert weighted by a [T, E]
combine matrix that is zero off the top-k, so no shape depends on the routing
and the block compiles with a dynamic token count and no graph breaks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from . import tp
from .config import ModelConfig, MoEConfig
from .layers import SwiGLUMLP, WeightInit, fan_in_normal
from .tp import TensorParallel


def route_topk_softmax(logits: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top-k of the logits, softmax over the picked k (in the logits dtype)."""
    values, expert_ids = torch.topk(logits, top_k, dim=-1)
    weights = torch.softmax(values, dim=1, dtype=values.dtype)
    return weights, expert_ids


def route_softmax_topk(
    logits: torch.Tensor,
    top_k: int,
    *,
    renormalize: bool,
    softmax_upcast: str,
    out_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen3-MoE ("dtype_arg") / Mixtral ("float_call"): fp32 softmax over all experts, then top-k."""
    if softmax_upcast == "float_call":
        probs = torch.softmax(logits.float(), dim=-1)
    else:
        probs = torch.softmax(logits, dim=-1, dtype=torch.float)
    weights, expert_ids = torch.topk(probs, top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(out_dtype), expert_ids


def route_sigmoid_bias(
    logits: torch.Tensor,
    top_k: int,
    *,
    correction_bias: torch.Tensor,
    routed_scaling_factor: float,
    n_group: int = 1,
    topk_group: int = 1,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3: the bias picks the experts, within the topk_group groups whose two
    best biased scores sum highest; the unbiased sigmoid scores weight them
    (renormalised, then scaled). Weights stay fp32."""
    scores = logits.float().sigmoid()
    choice = scores + correction_bias
    if n_group > 1:
        num_experts = choice.shape[-1]
        group_scores = choice.view(-1, n_group, num_experts // n_group).topk(2, dim=-1)[0].sum(dim=-1)
        group_ids = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter(1, group_ids, 1)
        expert_mask = group_mask.unsqueeze(-1).expand(-1, n_group, num_experts // n_group).reshape(-1, num_experts)
        choice = choice.masked_fill(~expert_mask.bool(), float("-inf"))
    expert_ids = torch.topk(choice, top_k, dim=-1, sorted=False)[1]
    weights = scores.gather(1, expert_ids)
    weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    weights = weights * routed_scaling_factor
    return weights, expert_ids


class Experts(nn.Module):
    """`num_experts` SwiGLU experts as stacked weights [E, ...].

    Under TP each rank holds a 1/W slice of every expert's intermediate dim
    (gate/up column-parallel, down row-parallel), so its output is a partial sum.
    `out_size > hidden_size` pads the down projection with zero rows.
    """

    def __init__(
        self,
        moe: MoEConfig,
        hidden_size: int,
        out_size: int,
        init: WeightInit,
        parallel: TensorParallel,
    ):
        super().__init__()
        experts, inter = moe.num_experts, moe.intermediate_size
        gate = torch.stack([fan_in_normal(init, inter, hidden_size) for _ in range(experts)])
        up = torch.stack([fan_in_normal(init, inter, hidden_size) for _ in range(experts)])
        down = torch.stack([fan_in_normal(init, hidden_size, inter) for _ in range(experts)])
        down = F.pad(down, (0, 0, 0, out_size - hidden_size))  # zero rows [hidden, out_size)

        what = "MoE expert intermediate_size"
        self.gate_proj = init.param(parallel.split(gate, 1, what))  # [E, I/W, H]
        self.up_proj = init.param(parallel.split(up, 1, what))  # [E, I/W, H]
        self.down_proj = init.param(parallel.split(down, 2, what))  # [E, out, I/W]
        self.compute = moe.expert_compute

    def forward(self, x: torch.Tensor, weights: torch.Tensor, expert_ids: torch.Tensor) -> torch.Tensor:
        """x [T, H], routing weights and expert ids [T, k] -> [T, out]."""
        if self.compute == "grouped" and hasattr(torch, "_grouped_mm"):
            return self._grouped(x, weights, expert_ids)
        return self._dense(x, weights, expert_ids)

    def _dense(self, x, weights, expert_ids):
        """Every expert on every token, weighted by a [T, E] combine matrix (0 where not routed)."""
        combine = torch.zeros(x.shape[0], self.gate_proj.shape[0], dtype=x.dtype, device=x.device)
        combine = combine.scatter(1, expert_ids, weights.to(x.dtype))
        x = x.unsqueeze(0)  # broadcast over experts
        gate = x @ self.gate_proj.transpose(1, 2)  # [E, T, I/W]
        up = x @ self.up_proj.transpose(1, 2)
        out = (F.silu(gate) * up) @ self.down_proj.transpose(1, 2)  # [E, T, out]
        return (out * combine.t().unsqueeze(-1)).sum(0)

    def _grouped(self, x, weights, expert_ids):
        """The T*k token copies sorted by expert, one grouped GEMM per projection; static
        shapes throughout, so it compiles and captures in CUDA graphs."""
        num_tokens, top_k = expert_ids.shape
        num_experts = self.gate_proj.shape[0]
        flat_ids = expert_ids.reshape(-1)
        order = torch.argsort(flat_ids, stable=True)
        token = order // top_k
        per_expert = torch.zeros(num_experts, dtype=torch.int32, device=x.device)
        per_expert = per_expert.index_add(0, flat_ids, torch.ones_like(flat_ids, dtype=torch.int32))
        ends = torch.cumsum(per_expert, 0, dtype=torch.int32)
        copies = x[token]  # [T*k, H], grouped by expert
        gate = torch._grouped_mm(copies, self.gate_proj.transpose(1, 2), offs=ends)
        up = torch._grouped_mm(copies, self.up_proj.transpose(1, 2), offs=ends)
        out = torch._grouped_mm(F.silu(gate) * up, self.down_proj.transpose(1, 2), offs=ends)
        out = out * weights.reshape(-1)[order].to(out.dtype).unsqueeze(-1)
        return torch.zeros(num_tokens, out.shape[1], dtype=out.dtype, device=x.device).index_add(0, token, out)


class MoE(nn.Module):
    """Router (replicated under TP) -> routing -> experts (+ shared expert).

    Under TP the experts' and shared expert's partial sums are added locally and
    all-reduced once. With a padded output the all-reduce is of the padded
    [T, padded] tensor and the slice back to [T, hidden] comes after it.
    """

    def __init__(self, cfg: ModelConfig, init: WeightInit, parallel: TensorParallel):
        super().__init__()
        moe = cfg.moe
        assert moe is not None
        hidden = cfg.hidden_size
        self.moe_config = moe
        self.hidden_size = hidden

        # std 0.5 rather than fan-in scaling: spread-out logits make routing
        # non-degenerate, so different tokens pick different experts.
        router_weight = init.normal(moe.num_experts, hidden, std=0.5)
        router_bias = init.normal(moe.num_experts, std=0.5) if moe.router_bias else None
        self.router = init.linear(router_weight, router_bias)
        if moe.routing == "sigmoid_bias":
            # Kept in fp32, as DeepSeek-V3 does.
            bias = init.normal(moe.num_experts, std=0.05)
            self.register_buffer("e_score_correction_bias", init.buffer(bias, torch.float32))

        self.padded_size = moe.padded_size(hidden)
        self.experts = Experts(moe, hidden, self.padded_size, init, parallel)
        self.shared_expert = (
            SwiGLUMLP(
                hidden, moe.shared_expert_intermediate_size, init, parallel, reduce_output=False
            )
            if moe.shared_expert_intermediate_size
            else None
        )
        self.tp_group = parallel.group

    def route(
        self, logits: torch.Tensor, out_dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, E] router logits -> (weights [T, k], expert ids [T, k])."""
        moe = self.moe_config
        if moe.routing == "topk_softmax":
            return route_topk_softmax(logits, moe.top_k)
        if moe.routing == "softmax_topk":
            return route_softmax_topk(
                logits,
                moe.top_k,
                renormalize=moe.renormalize,
                softmax_upcast=moe.softmax_upcast,
                out_dtype=out_dtype,
            )
        return route_sigmoid_bias(
            logits,
            moe.top_k,
            correction_bias=self.e_score_correction_bias,
            routed_scaling_factor=moe.routed_scaling_factor,
            n_group=moe.n_group,
            topk_group=moe.topk_group,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.router(x)
        weights, expert_ids = self.route(logits, x.dtype)
        out = self.experts(x, weights, expert_ids)
        if self.shared_expert is not None:
            out = out + self.shared_expert(x)
        if self.tp_group is not None:
            out = tp.all_reduce(out, self.tp_group)
        if self.padded_size != self.hidden_size:
            out = out[..., : self.hidden_size]
        return out
