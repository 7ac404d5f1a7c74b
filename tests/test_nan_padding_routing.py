"""A padded token whose hidden state is NaN (what a CUDA-graph padding row can hold): in the
compiled model its routing stays valid, k distinct experts with finite weights, and the live
tokens route as in eager. Eager hands the MoE kernels NaN weights for that token."""

import pytest
import torch

import fusion_passes
from fusion_passes.models import build_model


class Routing(torch.nn.Module):
    """A built-in MoE block's router linear and routing, as the model runs them."""

    def __init__(self, moe):
        super().__init__()
        self.moe = moe

    def forward(self, x):
        return self.moe.route(self.moe.router(x), x.dtype)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
@pytest.mark.parametrize("name", ["qwen3-moe", "gpt-oss"])
def test_nan_padding_token_gets_valid_routing(name, device):
    moe = build_model(name, 1, device=device).layers[0].mlp
    config = moe.moe_config
    routing = Routing(moe)
    x = torch.randn(6, moe.hidden_size, device=device, generator=torch.Generator(device).manual_seed(0))
    x[-1] = float("nan")  # the padding token
    torch._dynamo.reset()
    backend = fusion_passes.Backend()
    with torch.no_grad():
        weights, ids = torch.compile(routing, backend=backend)(x)
        eager_weights, eager_ids = routing(x)
    assert backend.report.counts["router_gemm"] == 1 and backend.report.counts["nan_safe_routing"] == 1

    padding_ids, padding_weights = ids[-1].tolist(), weights[-1].float()
    assert len(set(padding_ids)) == config.top_k and all(0 <= e < config.num_experts for e in padding_ids)
    assert torch.isfinite(padding_weights).all() and (padding_weights >= 0).all()
    torch.testing.assert_close(padding_weights.sum(), torch.tensor(1.0, device=device))
    assert eager_weights[-1].isnan().all(), f"eager: ids {eager_ids[-1].tolist()}, weights {eager_weights[-1].tolist()}"

    assert torch.equal(ids[:-1], eager_ids[:-1])
    torch.testing.assert_close(weights[:-1].float(), eager_weights[:-1].float())
