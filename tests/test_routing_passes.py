"""router_gemm and nan_safe_routing on small modules: every form that must match, the
numerics against eager, and the look-alikes that must not match."""

import unittest

import pytest
import torch
import torch.nn.functional as F
from helpers import compile_and_run, region

import fusion_passes
from fusion_passes import ops

try:
    from expecttest import TestCase
except ImportError:  # the golden-graph classes need expecttest; every other test runs without it

    @unittest.skip("expecttest is not installed")
    class TestCase(unittest.TestCase):
        pass


H, E = 32, 8


class Router(torch.nn.Module):
    """A router linear followed by one of the routing forms real models use."""

    def __init__(self, form, bias=False, k=2, experts=E, renormalize=True, eps=0.0, rounded=False):
        super().__init__()
        self.gate = torch.nn.Linear(H, experts, bias=bias)
        self.form, self.k, self.renormalize, self.eps = form, k, renormalize, eps
        # The probabilities rounded to the logits' dtype before they are ranked (ROUNDED_FORMS).
        self.rounded = rounded
        self.register_buffer("correction", torch.randn(experts) * 0.1)

    def forward(self, x):
        logits = self.gate(x)
        if logits.dim() == 3:
            logits = logits.flatten(0, 1)
        if self.form == "softmax_topk":  # Qwen3-MoE; rounded: DBRX in bf16
            p = torch.softmax(logits, dim=-1) if self.rounded else torch.softmax(logits, dim=-1, dtype=torch.float)
            w, ids = torch.topk(p, self.k, dim=-1)
            if self.renormalize:
                w = w / (w.sum(dim=-1, keepdim=True) + self.eps)
            return w.to(x.dtype), ids
        if self.form.startswith("softmax_topk_norm"):  # DBRX: divided by the p-norm of the top-k (p=1: their sum)
            p = torch.softmax(logits, dim=1, dtype=torch.float)  # DBRX's own is in the logits' dtype
            w, ids = torch.topk(p, self.k, dim=-1)
            return w / torch.norm(w, p=float(self.form[-1]), dim=-1, keepdim=True), ids
        if self.form == "upcast_softmax_topk":  # Mixtral
            p = torch.softmax(logits.float(), dim=-1)
            w, ids = torch.topk(p, self.k, dim=-1)
            return w / w.sum(dim=-1, keepdim=True), ids
        if self.form == "topk_softmax":  # gpt-oss
            v, ids = torch.topk(logits, self.k, dim=-1)
            return torch.softmax(v, dim=1, dtype=v.dtype), ids
        if self.form == "sigmoid_topk":
            s = logits.float().sigmoid()
            w, ids = torch.topk(s, self.k, dim=-1)
            if self.renormalize:
                w = w / w.sum(dim=-1, keepdim=True)
            return w, ids
        if self.form == "sigmoid_bias":  # DeepSeek-V3 without groups; rounded: p + bias in bf16 too
            s = logits.sigmoid() if self.rounded else logits.float().sigmoid()
            ids = torch.topk(s + self.correction, self.k, dim=-1)[1]
            w = s.gather(1, ids)
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
            return w * 2.5, ids
        if self.form == "softmax_bias_clamp":  # ERNIE 4.5, LongCat-Flash; rounded: ZAYA in bf16
            p = torch.softmax(logits, dim=1) if self.rounded else torch.softmax(logits, dim=1, dtype=torch.float)
            ids = torch.topk(p.float() + self.correction, self.k, dim=-1)[1]
            w = torch.gather(p, dim=-1, index=ids)
            return (w / torch.clamp(w.sum(dim=-1, keepdim=True), min=1e-12)).to(x.dtype), ids
        if self.form.startswith("grouped_"):
            return grouped(self.form, logits, self.correction, self.k, self.rounded)
        raise AssertionError(self.form)


GROUPS, TOPK_GROUP = 4, 2


def grouped(form, logits, correction, k, rounded=False):
    """Group-limited routing (GROUPS groups, the best TOPK_GROUP kept) as models write it."""
    tokens, experts = logits.shape
    if form == "grouped_sigmoid_bias":  # DeepSeek-V3 / GLM-4.5 / dots1 in transformers
        scores = logits.float().sigmoid()
        choice = scores + correction
        group_scores = choice.view(-1, GROUPS, experts // GROUPS).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=TOPK_GROUP, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, experts // GROUPS).reshape(-1, experts)
        choice = choice.masked_fill(~score_mask.bool(), float("-inf"))
        ids = torch.topk(choice, k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        w /= w.sum(dim=-1, keepdim=True) + 1e-20
        return w * 2.5, ids
    if form == "grouped_engine":  # a serving engine: a boolean group mask, where, no renormalization
        scores = torch.sigmoid(logits.float())
        choice = scores + correction.unsqueeze(0)
        group_scores = torch.topk(choice.view(tokens, GROUPS, -1), 2, dim=-1).values.sum(-1)
        group_idx = torch.topk(group_scores, TOPK_GROUP, dim=-1).indices
        keep = torch.zeros(tokens, GROUPS, dtype=torch.bool, device=logits.device).scatter(1, group_idx, True)
        keep = keep[:, :, None].expand(tokens, GROUPS, experts // GROUPS).reshape(tokens, experts)
        ids = torch.topk(torch.where(keep, choice, float("-inf")), k, dim=-1).indices
        return scores.gather(1, ids), ids
    if form == "grouped_softmax_max":  # DeepSeek-V2 group_limited_greedy: fill 0.0, the values weight
        scores = logits.float().softmax(dim=-1)
        group_scores = scores.view(-1, GROUPS, experts // GROUPS).max(dim=-1).values
        group_idx = torch.topk(group_scores, k=TOPK_GROUP, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, experts // GROUPS).reshape(-1, experts)
        w, ids = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=k, dim=-1, sorted=False)
        return w * 16.0, ids
    if form == "grouped_softmax_top2":  # Mistral 4: fill 0.0, gather; rounded: Mistral 4 in bf16
        scores = logits.softmax(-1) if rounded else logits.float().softmax(-1)
        group_scores = scores.view(-1, GROUPS, experts // GROUPS).topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=TOPK_GROUP, dim=-1, sorted=False)[1]
        group_mask = torch.zeros_like(group_scores)
        group_mask.scatter_(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, experts // GROUPS).reshape(-1, experts)
        ids = torch.topk(scores.masked_fill(~score_mask.bool(), 0.0), k=k, dim=-1, sorted=False)[1]
        w = scores.gather(1, ids)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20), ids
    raise AssertionError(form)


GROUPED_FORMS = ["grouped_sigmoid_bias", "grouped_engine", "grouped_softmax_max", "grouped_softmax_top2"]
FORMS = [
    "softmax_topk",
    "softmax_topk_norm1",
    "upcast_softmax_topk",
    "topk_softmax",
    "sigmoid_topk",
    "sigmoid_bias",
    "softmax_bias_clamp",
    *GROUPED_FORMS,
]


def run(module, x, **config):
    # These tests read the two passes' own output, which router_routing would fuse
    # (tests/test_router_routing.py covers that pass).
    config.setdefault("router_routing", False)
    backend, out, graphs = compile_and_run(module, x, config=fusion_passes.PassConfig(**config))
    with torch.no_grad():
        ref = module(x)
    return backend.report.counts, out, ref, graphs


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_routing_form_matches_and_agrees_with_eager(form, dtype):
    torch.manual_seed(0)
    experts = 16 if form in GROUPED_FORMS else E
    module = Router(form, bias=form == "topk_softmax", k=4 if form in GROUPED_FORMS else 2, experts=experts).to(dtype)
    x = torch.randn(7, H, dtype=dtype)
    counts, (w, ids), (w_ref, ids_ref), _ = run(module, x)
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 1
    assert w.dtype == w_ref.dtype and ids.dtype == ids_ref.dtype == torch.int64
    if form in GROUPED_FORMS:  # sorted=False: the order of the picked experts is unspecified
        order, order_ref = ids.argsort(dim=-1), ids_ref.argsort(dim=-1)
        ids, w = ids.gather(1, order), w.gather(1, order)
        ids_ref, w_ref = ids_ref.gather(1, order_ref), w_ref.gather(1, order_ref)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(w.float(), w_ref.float(), rtol=tol, atol=tol)


# Forms whose Router(rounded=True) ranks probabilities rounded to the model's dtype.
ROUNDED_FORMS = ["softmax_topk", "sigmoid_bias", "softmax_bias_clamp", "grouped_softmax_top2"]


def sorted_by_id(weights, ids):
    order = ids.argsort(dim=-1)
    return weights.gather(1, order), ids.gather(1, order)


@pytest.mark.parametrize("form", ROUNDED_FORMS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def test_rounded_probabilities_are_ranked_unrounded(form, dtype, device):
    """DBRX, Mistral 4 and ZAYA in bf16 rank probabilities rounded to the model's dtype. The op
    ranks them in fp32, so it computes what the same model computes with its probabilities
    kept in fp32; where the rounding ties or swaps scores it may choose other experts than
    eager, so upcast_low_precision_routing=False leaves such routing alone. On the GPU,
    Inductor's graphs of the rounding differ (online softmax, Triton casts)."""
    torch.manual_seed(0)
    shape = dict(k=4, experts=16) if form in GROUPED_FORMS else dict(k=2, experts=E)
    rounded = Router(form, rounded=True, **shape).to(dtype=dtype, device=device)
    unrounded = Router(form, **shape).to(dtype=dtype, device=device)
    unrounded.load_state_dict(rounded.state_dict())
    x = torch.randn(7, H, dtype=dtype).to(device)
    counts, (_, ids), (_, ids_eager), _ = run(rounded, x, upcast_low_precision_routing=False)
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 0
    if device == "cpu":  # stock Inductor's GPU kernels round differently from eager
        torch.testing.assert_close(ids, ids_eager, rtol=0, atol=0)

    counts, (w, ids), (w_eager, _), graphs = run(rounded, x)
    assert counts["nan_safe_routing"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.topk_routing]
    assert call.args[0].meta["val"].dtype == dtype  # the model's logits, not a rounded score
    assert w.dtype == w_eager.dtype
    # The twin's graph gives the op the same logits and arguments: the same experts.
    twin_counts, (w_twin, ids_twin), (w_ref, ids_ref), _ = run(unrounded, x)
    assert twin_counts["nan_safe_routing"] == 1
    (w, ids), (w_twin, ids_twin) = sorted_by_id(w, ids), sorted_by_id(w_twin, ids_twin)
    torch.testing.assert_close(ids, ids_twin, rtol=0, atol=0)
    torch.testing.assert_close(w.float(), w_twin.float(), rtol=1e-2, atol=1e-2)
    if device == "cpu":  # and what the twin computes in eager (on the GPU cuBLAS's logits may differ)
        w_ref, ids_ref = sorted_by_id(w_ref, ids_ref)
        torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
        torch.testing.assert_close(w.float(), w_ref.float(), rtol=1e-2, atol=1e-2)


def test_rounding_of_something_else_than_probabilities_does_not_match():
    """A rounding is looked through only where probabilities are rounded: a top-k of rounded
    logits (no softmax or sigmoid) still does not match."""

    class RoundedLogits(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(H, E, bias=False)

        def forward(self, x):
            scores = self.gate(x.float()).to(torch.bfloat16)
            return torch.topk(scores, 2, dim=-1)

    counts, *_ = run(RoundedLogits(), torch.randn(5, H))
    assert counts["nan_safe_routing"] == 0


@pytest.mark.parametrize("renormalize", [True, False])
def test_renormalize_on_and_off(renormalize):
    module = Router("softmax_topk", renormalize=renormalize)
    counts, (w, _), (w_ref, _), graphs = run(module, torch.randn(5, H))
    assert counts["nan_safe_routing"] == 1
    torch.testing.assert_close(w, w_ref)
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.topk_routing]
    assert call.args[3] is renormalize


@pytest.mark.parametrize("norm, renormalize", [(1, True), (2, False)])
def test_a_one_norm_renormalizes_and_a_two_norm_stays_in_the_graph(norm, renormalize):
    """Of probabilities, the 1-norm is the sum the op divides by; the 2-norm is not, so
    the op's raw probabilities replace the top-k values and the graph keeps its division."""
    module = Router(f"softmax_topk_norm{norm}")
    counts, (w, ids), (w_ref, ids_ref), graphs = run(module, torch.randn(5, H))
    assert counts["nan_safe_routing"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.topk_routing]
    assert call.args[3] is renormalize
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref)


@pytest.mark.parametrize("shape", [(6, H), (2, 3, H)], ids=["2d", "3d"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_router_gemm_forms(shape, bias, dtype):
    torch.manual_seed(1)
    module = Router("softmax_topk", bias=bias).to(dtype)
    x = torch.randn(*shape, dtype=dtype)
    counts, (w, ids), (w_ref, ids_ref), graphs = run(module, x, nan_safe_routing=False)
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 0
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w.float(), w_ref.float(), rtol=2e-2, atol=2e-2)
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.router_gemm]
    assert (call.args[2] is not None) is bias


class Fp32Router(torch.nn.Module):
    """DeepSeek-V3's router in transformers: F.linear(x.float(), w.float()) of a bf16 model."""

    def __init__(self, dtype):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.randn(E, H, dtype=dtype))
        self.register_buffer("correction", torch.randn(E) * 0.1)

    def forward(self, x):
        logits = F.linear(x.float(), self.weight.float())
        scores = logits.sigmoid()
        ids = torch.topk(scores + self.correction, 2, dim=-1)[1]
        w = scores.gather(1, ids)
        return w / (w.sum(dim=-1, keepdim=True) + 1e-20), ids


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_fp32_router_of_upcast_operands_takes_the_originals(dtype):
    torch.manual_seed(0)
    module = Fp32Router(dtype)
    x = torch.randn(6, H, dtype=dtype)
    counts, (w, ids), (w_ref, ids_ref), graphs = run(module, x, nan_safe_routing=False)
    assert counts["router_gemm"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.router_gemm]
    assert [a.meta["val"].dtype for a in call.args[:2]] == [dtype, dtype] and call.args[3] == torch.float32
    placeholders = [n for g in graphs for n in g.nodes if n.op == "placeholder"]
    (weight,) = [n for n in placeholders if getattr(n.meta["val"], "shape", None) == (E, H)]
    assert not [u for u in weight.users if u.target is not ops.router_gemm]  # no cast of the weight runs
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref)


def test_fp32_router_of_fp32_weights_stays_fp32():
    module = Fp32Router(torch.float32)
    counts, _, _, graphs = run(module, torch.randn(6, H, dtype=torch.bfloat16), nan_safe_routing=False)
    assert counts["router_gemm"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.router_gemm]
    assert call.args[0].meta["val"].dtype == torch.float32 and len(call.args) == 3


def test_dynamic_token_count_matches_once_for_all_sizes():
    module = Router("softmax_topk")
    backend = fusion_passes.Backend()
    torch._dynamo.reset()
    compiled = torch.compile(module, backend=backend, dynamic=True)
    with torch.no_grad():
        for tokens in (3, 9, 17):
            compiled(torch.randn(tokens, H))
    assert len(backend.report.graphs) == 1
    assert backend.report.counts["router_gemm"] == 1 and backend.report.counts["nan_safe_routing"] == 1


class NotRouters(torch.nn.Module):
    """Linears and top-ks that are not MoE routing."""

    def __init__(self, vocab=1000):
        super().__init__()
        self.proj = torch.nn.Linear(H, H)
        self.head = torch.nn.Linear(H, vocab, bias=False)

    def forward(self, x):
        h = F.silu(self.proj(x))  # a linear that feeds no top-k
        logits = self.head(h)  # vocab-wide: a sampler, not a router
        v, ids = torch.topk(logits, 4, dim=-1)
        probs = torch.softmax(v, dim=-1)  # top-k -> softmax, but over a vocabulary
        small = h[:, :8]
        smallest = torch.topk(small, 2, dim=-1, largest=False)  # not largest
        first_dim = torch.topk(torch.softmax(small, dim=-1), 2, dim=0)  # not the last dim
        raw = torch.topk(small, 2, dim=-1)  # raw values used as weights: no softmax
        return probs, ids, smallest.values, first_dim.values, raw.values * 2


def test_look_alikes_do_not_match():
    counts, outs, refs, _ = run(NotRouters(), torch.randn(5, H))
    assert counts == {name: 0 for name in fusion_passes.PASS_NAMES}
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)


def test_max_experts_limits_both_passes():
    module = Router("softmax_topk", experts=16)
    counts, *_ = run(module, torch.randn(5, H), max_experts=8)
    assert counts["router_gemm"] == 0 and counts["nan_safe_routing"] == 0
    counts, *_ = run(module, torch.randn(5, H), max_experts=16)
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 1


def test_large_renormalization_eps_is_not_the_ops_guard():
    counts, *_ = run(Router("softmax_topk", eps=1e-3), torch.randn(5, H))
    assert counts["nan_safe_routing"] == 0


def test_values_used_elsewhere_keep_their_meaning():
    class ExposesRawTopValues(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.gate = torch.nn.Linear(H, E, bias=False)

        def forward(self, x):
            p = torch.softmax(self.gate(x), dim=-1)
            w, ids = torch.topk(p, 2, dim=-1)
            return w / w.sum(-1, keepdim=True), w.max(), ids

    counts, out, ref, _ = run(ExposesRawTopValues(), torch.randn(5, H))
    assert counts["nan_safe_routing"] == 1  # matched as raw (renormalize=False) weights
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)


def test_nan_rows_get_distinct_ids_and_finite_weights_where_eager_does_not():
    torch.manual_seed(0)
    module = Router("softmax_topk", k=4)
    x = torch.randn(4, H)
    x[1] = float("nan")  # a padding token whose hidden state went bad
    counts, (w, ids), (w_ref, ids_ref), _ = run(module, x)
    assert counts["nan_safe_routing"] == 1
    assert torch.isnan(w_ref[1]).all()  # what eager hands the MoE kernels
    assert torch.isfinite(w).all() and (w >= 0).all()
    assert all(len(set(row.tolist())) == 4 for row in ids)
    assert ids[1].tolist() == [0, 1, 2, 3]
    torch.testing.assert_close(w[1], torch.full((4,), 0.25))
    keep = [0, 2, 3]
    torch.testing.assert_close(ids[keep], ids_ref[keep], rtol=0, atol=0)
    torch.testing.assert_close(w[keep], w_ref[keep])


class GoldenRoutingGraphs(TestCase):
    """The rewritten routing block, as the graph shows it (version-stable rendering)."""

    maxDiff = None

    def rewritten(self, form, dtype):
        module = Router(form, bias=form == "topk_softmax").to(dtype)
        _, _, _, graphs = run(module, torch.randn(5, H, dtype=dtype))
        return region(graphs, ops.router_gemm, ops.topk_routing)

    def test_qwen3_moe_form(self):
        self.assertExpectedInline(
            self.rewritten("softmax_topk", torch.bfloat16),
            """\
router_gemm_0: bf16[s, 8] = fusion_passes.router_gemm(input_1, input_0, None)
topk_routing_0: (f32[s, 2], i64[s, 2]) = fusion_passes.topk_routing(router_gemm_0, 2, 'softmax', True, None)
getitem_0: f32[s, 2] = getitem(topk_routing_0, 0)
getitem_1: i64[s, 2] = getitem(topk_routing_0, 1)
convert_element_type_0: bf16[s, 2] = prims.convert_element_type(getitem_0, torch.bfloat16)""",
        )

    def test_gpt_oss_form(self):
        self.assertExpectedInline(
            self.rewritten("topk_softmax", torch.bfloat16),
            """\
router_gemm_0: bf16[s, 8] = fusion_passes.router_gemm(input_2, input_0, input_1)
topk_routing_0: (f32[s, 2], i64[s, 2]) = fusion_passes.topk_routing(router_gemm_0, 2, 'softmax', True, None)
getitem_0: f32[s, 2] = getitem(topk_routing_0, 0)
getitem_1: i64[s, 2] = getitem(topk_routing_0, 1)
convert_element_type_0: bf16[s, 2] = prims.convert_element_type(getitem_0, torch.bfloat16)""",
        )

    def test_fp32_router_of_a_bf16_model(self):
        _, _, _, graphs = run(Fp32Router(torch.bfloat16), torch.randn(5, H, dtype=torch.bfloat16))
        self.assertExpectedInline(
            region(graphs, ops.router_gemm, ops.topk_routing),
            """\
router_gemm_0: f32[s, 8] = fusion_passes.router_gemm(input_0, input_1, None, torch.float32)
topk_routing_0: (f32[s, 2], i64[s, 2]) = fusion_passes.topk_routing(router_gemm_0, 2, 'sigmoid', True, input_2)
getitem_0: f32[s, 2] = getitem(topk_routing_0, 0)
getitem_1: i64[s, 2] = getitem(topk_routing_0, 1)""",
        )

    def test_group_limited_form(self):
        module = Router("grouped_sigmoid_bias", k=4, experts=16)
        _, _, _, graphs = run(module, torch.randn(5, H))
        self.assertExpectedInline(
            region(graphs, ops.router_gemm, ops.topk_routing),
            """\
router_gemm_0: f32[s, 16] = fusion_passes.router_gemm(input_1, input_0, None)
topk_routing_0: (f32[s, 4], i64[s, 4]) = fusion_passes.topk_routing(router_gemm_0, 4, 'sigmoid', True, input_2, 4, 2, 'top2_sum')
getitem_0: f32[s, 4] = getitem(topk_routing_0, 0)
getitem_1: i64[s, 4] = getitem(topk_routing_0, 1)
mul_0: f32[s, 4] = aten.mul.Tensor(getitem_0, 2.5)""",
        )

    def test_deepseek_v3_form(self):
        self.assertExpectedInline(
            self.rewritten("sigmoid_bias", torch.float32),
            """\
router_gemm_0: f32[s, 8] = fusion_passes.router_gemm(input_1, input_0, None)
topk_routing_0: (f32[s, 2], i64[s, 2]) = fusion_passes.topk_routing(router_gemm_0, 2, 'sigmoid', True, input_2)
getitem_0: f32[s, 2] = getitem(topk_routing_0, 0)
getitem_1: i64[s, 2] = getitem(topk_routing_0, 1)
mul_0: f32[s, 2] = aten.mul.Tensor(getitem_0, 2.5)""",
        )


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_online_softmax_form(dtype):
    """On GPUs Inductor turns amax + sum into one prepare_softmax_online reduction
    before the passes run; the routing must still be recognised, also where a bf16 softmax
    is computed in fp32 and rounded to bf16 before the top-k."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from fusion_passes.passes import nan_safe_routing
    from fusion_passes.passes._graph import PREPARE_SOFTMAX_ONLINE

    def routing(logits):
        x = logits.float()
        row_max, total = PREPARE_SOFTMAX_ONLINE(x, -1)
        w, ids = torch.topk((torch.exp(x - row_max) / total).to(logits.dtype), 2)
        return w / w.sum(-1, keepdim=True), ids

    logits = torch.randn(5, E, generator=torch.Generator().manual_seed(0)).to(dtype)  # no bf16 tie at the 2nd
    gm = make_fx(routing, tracing_mode="fake")(logits)
    assert nan_safe_routing.apply(gm.graph, fusion_passes.PassConfig()) == 1
    gm.recompile()
    assert not [n for n in gm.graph.nodes if n.target in (PREPARE_SOFTMAX_ONLINE, torch.ops.aten.topk.default)]
    (w, ids), (w_ref, ids_ref) = gm(logits), routing(logits)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref)


def test_addmm_with_a_broadcast_bias_is_not_a_router():
    class BroadcastBias(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.randn(E, H))
            self.bias = torch.nn.Parameter(torch.randn(1))  # one value broadcast over experts

        def forward(self, x):
            logits = torch.addmm(self.bias, x, self.weight.t())
            return torch.topk(torch.softmax(logits, dim=-1), 2, dim=-1)

    counts, outs, refs, _ = run(BroadcastBias(), torch.randn(5, H))
    assert counts["router_gemm"] == 0 and counts["nan_safe_routing"] == 1
    torch.testing.assert_close(outs[0], refs[0])


class Llama4Router(torch.nn.Module):
    """Llama 4's router: the top-k logits scattered into -inf, then sigmoid, a dense [T, E]
    score (0 for the experts not chosen). ``change`` alters one step, so that the op no
    longer computes it."""

    def __init__(self, change=None, k=2):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.change, self.k = change, k

    def forward(self, x):
        logits = self.gate(x)
        values, ids = torch.topk(logits, self.k, dim=1)
        fill = 0.0 if self.change == "scattered_into_zeros" else float("-inf")  # sigmoid(0) = 1/2
        scattered = torch.full_like(logits, fill).scatter_(1, ids, values)
        scores = torch.sigmoid(scattered.float()).to(scattered.dtype)
        if self.change == "scattered_used_elsewhere":
            return scores, scattered.exp()
        if self.change == "values_used_elsewhere":
            return scores, values * 2
        return scores


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_llama4_scattered_sigmoid_matches_and_agrees_with_eager(dtype):
    torch.manual_seed(0)
    module = Llama4Router().to(dtype)
    counts, scores, scores_ref, graphs = run(module, torch.randn(7, H, dtype=dtype))
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.topk_routing]
    assert call.args[1:4] == (2, "sigmoid", False)
    replaced = (torch.ops.aten.topk.default, torch.ops.aten.sigmoid.default)
    assert not [n for g in graphs for n in g.nodes if n.target in replaced]
    assert scores.dtype == dtype
    torch.testing.assert_close(scores != 0, scores_ref != 0, rtol=0, atol=0)  # the same experts chosen
    torch.testing.assert_close(scores, scores_ref, rtol=0, atol=0)


def test_llama4_nan_row_gets_k_distinct_experts_and_finite_scores():
    torch.manual_seed(0)
    module = Llama4Router(k=4)
    x = torch.randn(4, H)
    x[2] = float("nan")
    counts, scores, scores_ref, _ = run(module, x)
    assert counts["nan_safe_routing"] == 1
    assert scores_ref[2].isnan().any()  # what eager hands the experts
    assert torch.isfinite(scores).all() and (scores >= 0).all()
    # The op's all-NaN row: ids 0..k-1, weights p = 0, so the row routes nowhere.
    torch.testing.assert_close(scores[2], torch.zeros(E))
    keep = [0, 1, 3]
    torch.testing.assert_close(scores[keep], scores_ref[keep], rtol=0, atol=0)


@pytest.mark.parametrize("change", ["scattered_into_zeros", "scattered_used_elsewhere", "values_used_elsewhere"])
def test_llama4_look_alikes_do_not_match(change):
    counts, outs, refs, _ = run(Llama4Router(change), torch.randn(5, H))
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 0
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)


class BatchSequenceRouter(torch.nn.Module):
    """Routing of a [batch, seq, E] score, the top-k over its last dim (ZAYA's form)."""

    def __init__(self, form):
        super().__init__()
        self.gate = torch.nn.Linear(H, E, bias=False)
        self.register_buffer("correction", torch.randn(E) * 0.1)
        self.form = form

    def forward(self, x):
        logits = self.gate(x)
        if self.form == "topk_softmax":
            v, ids = torch.topk(logits, 2, dim=-1)
            return torch.softmax(v, dim=-1), ids
        p = torch.softmax(logits, dim=-1, dtype=torch.float)
        if self.form == "softmax_topk":
            w, ids = torch.topk(p, 2, dim=-1)
            return w / w.sum(dim=-1, keepdim=True), ids
        ids = torch.topk(p + self.correction, 2, dim=-1)[1]  # softmax + bias
        return torch.gather(p, dim=2, index=ids), ids


@pytest.mark.parametrize("form", ["softmax_topk", "softmax_bias", "topk_softmax"])
def test_routing_of_a_batch_sequence_score_matches_through_reshapes(form):
    """The op routes [rows, E]: the score is reshaped to rows and its outputs back to
    [batch, seq, k] (the batch size symbolic here)."""
    torch.manual_seed(0)
    counts, (w, ids), (w_ref, ids_ref), graphs = run(BatchSequenceRouter(form), torch.randn(3, 5, H))
    assert counts["nan_safe_routing"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.topk_routing]
    assert call.args[0].meta["val"].dim() == 2 and call.args[3] is (form != "softmax_bias")
    assert w.shape == ids.shape == (3, 5, 2)
    torch.testing.assert_close(ids, ids_ref, rtol=0, atol=0)
    torch.testing.assert_close(w, w_ref)


class GroupLimitedLookAlike(torch.nn.Module):
    """DeepSeek-V3's group-limited routing with one step changed so that the op no
    longer computes it."""

    def __init__(self, change):
        super().__init__()
        self.gate = torch.nn.Linear(H, 16, bias=False)
        self.register_buffer("correction", torch.randn(16) * 0.1)
        self.change = change

    def forward(self, x):
        scores = self.gate(x).sigmoid()
        choice = scores + self.correction
        grouped = choice.view(-1, GROUPS, 16 // GROUPS)
        if self.change == "top3_sum":
            group_scores = grouped.topk(3, dim=-1)[0].sum(dim=-1)
        else:
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)
        group_idx = torch.topk(group_scores, k=TOPK_GROUP, dim=-1)[1]
        group_mask = torch.zeros_like(group_scores).scatter(1, group_idx, 1)
        score_mask = group_mask.unsqueeze(-1).expand(-1, GROUPS, 16 // GROUPS).reshape(-1, 16).bool()
        if self.change == "keeps_dropped_groups":
            choice = choice.masked_fill(score_mask, float("-inf"))
        elif self.change == "zero_fill_with_bias":  # p + bias may be negative: 0.0 can win
            choice = choice.masked_fill(~score_mask, 0.0)
        else:
            choice = choice.masked_fill(~score_mask, float("-inf"))
        ids = torch.topk(choice, k=4, dim=-1)[1]
        return scores.gather(1, ids), ids


@pytest.mark.parametrize("change", ["top3_sum", "keeps_dropped_groups", "zero_fill_with_bias"])
def test_group_limited_look_alikes_do_not_match(change):
    counts, outs, refs, _ = run(GroupLimitedLookAlike(change), torch.randn(5, H))
    assert counts["nan_safe_routing"] == 0
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)


class GroupLimitedWithLongConsumers(torch.nn.Module):
    """DeepSeek-V2's form whose ids then pass through a long chain of ops (as the expert
    dispatch of some transformers versions does): the group top-k must still be found a
    few ops from the scores, not after a walk down the consumers."""

    def __init__(self):
        super().__init__()
        self.gate = torch.nn.Linear(H, 16, bias=False)

    def forward(self, x):
        weights, ids = grouped("grouped_softmax_max", self.gate(x), None, 4)
        dispatch = ids.flatten().sort().values
        for step in range(60):  # each step reads the last once: Inductor inlines the chain
            dispatch = (dispatch * 3 + step) % 17
        return weights.sort(dim=-1).values, dispatch  # an unsorted top-k: compare as sets


def test_group_limited_form_matches_whatever_follows_its_ids():
    counts, outs, refs, _ = run(GroupLimitedWithLongConsumers(), torch.randn(5, H))
    assert counts["router_gemm"] == 1 and counts["nan_safe_routing"] == 1
    for out, ref in zip(outs, refs):
        torch.testing.assert_close(out, ref)
