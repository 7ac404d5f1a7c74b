"""The routing passes on every MoE family of the installed transformers, each built from
a tiny random config (nothing is downloaded): router_gemm = nan_safe_routing = the
number of MoE layers, and the compiled model computes what eager does.

FAMILIES are the families this suite covers, each with its own routing code; a family
missing from the installed transformers is skipped. SAME_FORM_FAMILIES route with a form
that FAMILIES already cover; they are built only with FUSION_PASSES_ALL_FAMILIES=1 (a few
seconds each), so that the default suite stays short. NOT_COVERED names the MoE families
found in transformers' registry that are not covered, with the reason
(docs/passes/nan_safe_routing.md).
"""

import importlib
import os

import pytest
import torch
from helpers import compile_and_run

import fusion_passes
from fusion_passes.testing import assert_matches

transformers = pytest.importorskip("transformers")
from transformers.models.auto.configuration_auto import CONFIG_MAPPING  # noqa: E402

LAYERS = 1
MAX_PARAMETERS = 3_000_000  # a config this test did not make tiny would be built full size
EXPERT_COUNT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
# Applied to every key a family's config has.
TINY = dict(
    vocab_size=128,
    unpadded_vocab_size=128,
    hidden_size=64,
    intermediate_size=64,
    moe_intermediate_size=32,
    expert_intermediate_size=32,
    shared_expert_intermediate_size=32,
    shared_experts_intermediate_size=32,
    num_hidden_layers=LAYERS,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
    max_position_embeddings=64,
    num_experts=8,
    num_local_experts=8,
    n_routed_experts=8,
    moe_num_experts=8,
    num_experts_per_tok=2,
    moe_topk=2,
    moe_k=2,
    top_k=2,
    top_k_experts=2,
    first_k_dense_replace=0,
    moe_layer_start_index=0,
    decoder_sparse_step=1,
    moe_layer_freq=1,
    mlp_only_layers=[],
    mlp_layer_types=["sparse"] * LAYERS,
    num_dense_layers=0,
    num_experts_per_token=2,
    num_expert_group=1,
    index_n_heads=2,
    index_head_dim=16,
    pad_token_id=0,
    n_group=1,
    topk_group=1,
    sliding_window=16,
)
# Multi-head latent attention: every head has its own key and value; head_dim is the
# rotary part (as DeepSeek and LongCat-Flash derive it).
LATENT_ATTENTION = dict(
    kv_lora_rank=16,
    q_lora_rank=16,
    qk_rope_head_dim=8,
    qk_nope_head_dim=8,
    v_head_dim=16,
    num_key_value_heads=4,
    head_dim=8,
)
GROUPS = dict(n_routed_experts=16, num_local_experts=16, n_group=4, topk_group=2)
FAMILY_CONFIG = {
    "deepseek_v2": dict(**LATENT_ATTENTION, **GROUPS, topk_method="group_limited_greedy"),
    "deepseek_v3": dict(**LATENT_ATTENTION, **GROUPS),
    "dbrx": dict(
        d_model=64,
        n_heads=4,
        n_layers=LAYERS,
        max_seq_len=64,
        # DbrxAttention reads attn_config.rope_theta, which the attention config does not
        # define, and clamps by clip_qkv unconditionally (8.0 is the released model's).
        attn_config=dict(kv_n_heads=2, rope_theta=10_000.0, clip_qkv=8.0),
        ffn_config=dict(hidden_size=64, ffn_hidden_size=32, moe_num_experts=8, moe_top_k=2),
    ),
    "dots1": dict(GROUPS, n_shared_experts=1),
    "glm4_moe": dict(GROUPS),
    "glm4_moe_lite": dict(LATENT_ATTENTION),
    "deepseek_v32": dict(LATENT_ATTENTION),
    "glm_moe_dsa": dict(LATENT_ATTENTION),
    "hy_v4": dict(LATENT_ATTENTION),
    "sarvam_mla": dict(LATENT_ATTENTION),
    "jamba": dict(expert_layer_period=1, expert_layer_offset=0),
    "lfm2_moe": dict(layer_types=["full_attention"] * LAYERS),
    # Top-1 (all it supports) of softmax + bias over E experts and a skip expert, routed
    # as a [batch, seq, E + 1] score.
    "zaya": dict(num_experts_per_tok=1, top_k=1),
    "llama4_text": dict(intermediate_size_mlp=64),
    # Groups ranked by the sum of their two best probabilities, without a bias. The head
    # is the whole query/key head, half of it rotary (the default partial_rotary_factor).
    "mistral4": {**LATENT_ATTENTION, **GROUPS, "head_dim": 16},
    "mistral_large4_text": {**LATENT_ATTENTION, **GROUPS, "head_dim": 16},
    # Renormalized top-k (softmax -> top-k -> divide by the sum); qwen2_moe and olmoe keep
    # their default, the form without the division.
    "qwen3_moe": dict(norm_topk_prob=True),
    # Latent attention without rotary dimensions; its linear-attention layers have their
    # own heads.
    "glm5_next_text": {
        **LATENT_ATTENTION,
        "qk_rope_head_dim": 0,
        "qk_nope_head_dim": 16,
        "head_dim": 0,
        "linear_head_dim": 16,
        "linear_num_heads": 4,
    },
    "dots3_note_text": dict(LATENT_ATTENTION),
    # Multimodal rotary sections (time, height, width) that sum to half the rotary dimension.
    "hy_v4_vl_text": dict(LATENT_ATTENTION, rope_parameters=dict(rope_theta=10_000.0, mrope_section=[2, 1, 1])),
    "glm4v_moe_text": dict(
        rope_parameters=dict(rope_theta=10_000.0, partial_rotary_factor=0.5, mrope_section=[2, 1, 1])
    ),
    "axk1": dict(LATENT_ATTENTION, **GROUPS),
    # Without groups, as its released config.
    "axk2": dict(LATENT_ATTENTION, n_group=None, topk_group=None),
    # Its MoE block is off by default; the per-layer input embedding has its own sizes.
    "gemma4_text": dict(enable_moe_block=True, vocab_size_per_layer_input=128, hidden_size_per_layer_input=16),
    # The sliding-window layers have their own heads.
    "inkling2_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16),
    "inkling2_loop_text": dict(swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16),
    # The experts run at their own width between a down- and an up-projection.
    "muse_spark_text": dict(moe_hidden_size=32),
    # Step 3.5 / 3.7, a vision-language model: its text model has no auto class of its own.
    "step3p7": dict(
        share_expert_dim=32,
        num_sliding_attention_heads=4,
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2),
    ),
    # A decoder layer of LongCat-Flash holds two attention blocks and one MoE; two of its
    # 8 + 2 experts are zero-computation experts (the identity).
    "longcat_flash": dict(
        **LATENT_ATTENTION,
        num_layers=LAYERS,
        num_hidden_layers=2 * LAYERS,
        ffn_hidden_size=64,
        expert_ffn_hidden_size=32,
        zero_expert_num=2,
    ),
}
FAMILIES = [
    "deepseek_v2",
    "deepseek_v3",
    "dbrx",
    "dots1",
    "ernie4_5_moe",
    "exaone_moe",
    "glm4_moe",
    "gpt_oss",
    "granitemoe",
    "hunyuan_v1_moe",
    "jetmoe",
    "llama4_text",
    "longcat_flash",
    "minimax",
    "mistral4",
    "mistral_large4_text",
    "mixtral",
    "olmoe",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_next",
    "step3p7",
    "zaya",
]
SAME_FORM_FAMILIES = [
    "afmoe",
    "axk1",
    "axk2",
    "bailing_hybrid",
    "beam",
    "cohere2_moe",
    "deepseek_ocr2_text",
    "deepseek_v32",
    "diffusion_gemma_text",
    "dots3_note_text",
    "ergo",
    "flex_olmo",
    "flint",
    "gemma4_text",
    "glm4_moe_lite",
    "glm4v_moe_text",
    "glm5_next_text",
    "glm_moe_dsa",
    "granitemoe_swa",
    "granitemoehybrid",
    "granitemoeshared",
    "hy_v3",
    "hy_v4",
    "hy_v4_vl_text",
    "inkling2_loop_text",
    "inkling2_text",
    "jamba",
    "kimi_linear",
    "laguna",
    "lara_mini",
    "lfm2_moe",
    "mellum",
    "mimo_v2_flash",
    "minicpm5_moe",
    "minimax_m2",
    "minimax_m3_vl_text",
    "muse_spark_text",
    "nemotron_h",
    "openai_privacy_filter",
    "param2moe",
    "qwen3_5_moe_text",
    "qwen3_omni_moe_text",
    "qwen3_vl_moe_text",
    "qwen4_exp_text",
    "sarvam_mla",
    "sarvam_moe",
    "solar_open",
    "unlimited_ocr_text",
]
ALL_FAMILIES = os.environ.get("FUSION_PASSES_ALL_FAMILIES") == "1"
NOT_COVERED = {
    "phimoe": "sparsemixer routing (a jittered two-pass top-1 with masks) is not a form topk_routing computes",
    "llama4": "the vision-language model around llama4_text, whose routing that covers",
    "deepseek_v4": "hash layers take the ids from a token-id table (no top-k); the top-k layers score with"
    " sqrt(softplus(x)), neither softmax nor sigmoid",
    "mistral_large4": "the vision-language model around mistral_large4_text, whose routing that covers",
    "doge": "product-key retrieval experts: two top-ks over sqrt(E) keys and a top-k of their sums",
    "kolibri1": "experts chosen by logits + bias (the op chooses by p + bias: sigmoid(x) + b ranks otherwise)",
    "inkling_text": "weights normalized over the chosen and the shared experts' sigmoids together",
    "aria_text": "its expert GEMM calls .item(): torch 2.11 cannot resume inside that nested frame, so the"
    " router linear and the routing compile as separate graphs (router_gemm 0 there; torch 2.13 matches)",
    "kolibri1_1": "routes as kolibri1: experts chosen by logits + bias, the weights the sigmoids of the"
    " chosen logits (router_gemm 1, nan_safe_routing 0)",
    "ernie4_5_vl_moe_text": "a text and a vision expert set per layer: text tokens route through the text"
    " experts only (one match per layer), so the vision experts' routing is never built from text input",
    # Not built by this test yet (a test limitation, not a routing form):
    "switch_transformers": "not built: an encoder-decoder, its tiny config is still above MAX_PARAMETERS",
}


def tiny_config(name):
    config_class = CONFIG_MAPPING[name]
    defaults = config_class().to_dict()
    keys = defaults["text_config"] if isinstance(defaults.get("text_config"), dict) else defaults
    values = {**TINY, **FAMILY_CONFIG.get(name, {})}
    kwargs = {key: value for key, value in values.items() if key in keys}
    if keys.get("layer_types") and "layer_types" not in kwargs:
        kwargs["layer_types"] = keys["layer_types"][:LAYERS]
    if keys is defaults:
        return config_class(**kwargs)
    # A vision-language model: its own keys (a tiny vision_config) beside the text model's.
    outer = {key: value for key, value in FAMILY_CONFIG.get(name, {}).items() if key in defaults}
    return config_class(text_config=kwargs, **outer)


def model_constructor(config):
    """from_config of the family's causal LM, of its bare model where it has none (Mistral 4),
    or, for a text model without an auto class (that of a multimodal model), of the text
    model class its modeling module defines for that config."""
    for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
        if type(config) in auto._model_mapping:
            return auto.from_config
    module = importlib.import_module(type(config).__module__.replace(".configuration_", ".modeling_"))
    return next(
        cls._from_config
        for name, cls in vars(module).items()
        if name.endswith("TextModel") and getattr(cls, "config_class", None) is type(config)
    )


def build(name):
    config = tiny_config(name)
    make = model_constructor(config)
    with torch.device("meta"):  # the size check costs no memory
        parameters = sum(p.numel() for p in make(config).parameters())
    assert parameters <= MAX_PARAMETERS, f"{name}: the tiny config still has {parameters} parameters"
    torch.manual_seed(0)
    model = make(config)
    for p in model.parameters():  # a random, non-degenerate router
        torch.nn.init.normal_(p, std=0.2)
    return model.eval()


def moe_layers(model) -> int:
    """MoE blocks: the modules that hold the experts."""
    return sum(1 for m in model.modules() if isinstance(getattr(m, "experts", None), torch.nn.Module))


class Logits(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        out = self.model(input_ids=input_ids, use_cache=False)
        return out.logits if "logits" in out else out.last_hidden_state


@pytest.mark.parametrize(
    "name",
    FAMILIES
    + [
        pytest.param(name, marks=pytest.mark.skipif(not ALL_FAMILIES, reason="FUSION_PASSES_ALL_FAMILIES=1 builds it"))
        for name in SAME_FORM_FAMILIES
    ],
)
def test_family_matches_once_per_moe_layer_and_agrees_with_eager(name):
    if name not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    model = build(name)
    layers = moe_layers(model)
    assert layers == LAYERS
    module = Logits(model)
    input_ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    backend, out, _ = compile_and_run(module, input_ids, codegen=False, dynamic_dim0=False)
    assert_matches(backend.report, router_gemm=layers, nan_safe_routing=layers)
    with torch.no_grad():
        expected = module(input_ids)
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


# Families that compute their routing probabilities in the model's dtype: served in bf16,
# they rank probabilities rounded to bf16 (docs/passes/nan_safe_routing.md, "Probabilities
# rounded to bf16/fp16").
ROUNDED_IN_BF16 = ["dbrx", "lfm2_moe", "mistral4", "zaya"]


@pytest.mark.parametrize("name", ROUNDED_IN_BF16)
def test_bf16_families_route_unrounded(name):
    """In bf16 these families match once per MoE layer, ranked unrounded, and compute what
    eager does within bf16 rounding; with upcast_low_precision_routing=False, not at all."""
    if name not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} has no {name}")
    model = build(name).to(torch.bfloat16)
    layers = moe_layers(model)
    module = Logits(model)
    input_ids = torch.randint(0, 128, (1, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = module(input_ids)
    backend, out, _ = compile_and_run(module, input_ids, codegen=False, dynamic_dim0=False)
    assert_matches(backend.report, router_gemm=layers, nan_safe_routing=layers)
    torch.testing.assert_close(out, expected, rtol=2e-2, atol=2e-2 * expected.abs().max().item())
    config = fusion_passes.PassConfig(upcast_low_precision_routing=False)
    backend, _, _ = compile_and_run(module, input_ids, config=config, codegen=False, dynamic_dim0=False)
    assert_matches(backend.report, router_gemm=layers, nan_safe_routing=0)


def test_not_covered_families_are_moe_families():
    """NOT_COVERED names families that exist (in some transformers) and route over experts."""
    def names_experts(config: dict) -> bool:  # DBRX keeps them in its ffn_config
        return any(key in config for key in EXPERT_COUNT_KEYS) or any(
            names_experts(value) for value in config.values() if isinstance(value, dict)
        )

    for name in set(NOT_COVERED) & set(CONFIG_MAPPING.keys()):
        assert names_experts(CONFIG_MAPPING[name]().to_dict()), name
