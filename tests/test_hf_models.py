"""The passes on the models users actually run: Hugging Face transformers' own GptOss,
Qwen3Moe and Mixtral implementations, built from tiny random configs (nothing is
downloaded). Skipped when transformers is not installed."""

import pytest
import torch
from helpers import compile_and_run

from fusion_passes.testing import assert_matches

transformers = pytest.importorskip("transformers")

LAYERS = 2
COMMON = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
)


def tiny(name):
    if name == "gpt_oss":
        config = transformers.GptOssConfig(
            **COMMON, num_local_experts=8, num_experts_per_tok=2, layer_types=["full_attention"] * LAYERS, sliding_window=16
        )
        model = transformers.GptOssForCausalLM(config)
    elif name == "qwen3_moe":
        config = transformers.Qwen3MoeConfig(
            **COMMON, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32, norm_topk_prob=True, decoder_sparse_step=1
        )
        model = transformers.Qwen3MoeForCausalLM(config)
    else:
        config = transformers.MixtralConfig(**COMMON, num_local_experts=8, num_experts_per_tok=2)
        model = transformers.MixtralForCausalLM(config)
    torch.manual_seed(0)
    for p in model.parameters():  # a random, non-degenerate router
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        return self.model(input_ids=input_ids, use_cache=False).logits


@pytest.mark.parametrize("name", ["gpt_oss", "qwen3_moe", "mixtral"])
def test_hf_moe_models_match_once_per_moe_layer(name):
    model = Logits(tiny(name))
    input_ids = torch.randint(0, 128, (1, 9))
    backend, out, _ = compile_and_run(model, input_ids, codegen=False, dynamic_dim0=False)
    assert_matches(backend.report, router_gemm=LAYERS, nan_safe_routing=LAYERS)
    with torch.no_grad():
        expected = model(input_ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)
