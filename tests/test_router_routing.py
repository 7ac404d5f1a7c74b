"""fusion_passes::router_routing and the router_routing pass, on CPU: the op is exactly
the two ops composed (logits rounded to logits_dtype first), its checks are theirs, and
the pass fuses topk_routing(router_gemm(...)) only where the logits feed nothing else."""

import pytest
import torch
from helpers import compile_and_run, region
from test_routing_passes import FORMS, H, Router

import fusion_passes
from fusion_passes import ops
from fusion_passes.models import MODELS, build_model, example_inputs

# (k, scoring, renormalize, with correction bias, n_group, topk_group, group_score) over E = 16.
ROUTINGS = [
    (2, "softmax", True, False, 1, 1, "top2_sum"),
    (4, "softmax", False, False, 1, 1, "top2_sum"),
    (2, "sigmoid", True, False, 1, 1, "top2_sum"),
    (4, "sigmoid", True, True, 1, 1, "top2_sum"),
    (4, "sigmoid", True, True, 4, 2, "top2_sum"),  # DeepSeek-V3's form, scaled down
    (3, "softmax", True, False, 4, 2, "max"),  # DeepSeek-V2's group-limited greedy
    (2, "sigmoid", False, True, 8, 1, "top2_sum"),  # groups of two experts
    (4, "softmax", True, False, 4, 2, "top2_sum"),  # groups ranked by probabilities (Mistral 4)
    (2, "sigmoid", False, False, 8, 2, "top2_sum"),  # the same for sigmoid, groups of two
]
EXPERTS = 16


def routing_case(dtype, bias, correction, tokens=7, hidden=40, seed=0):
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=generator).to(dtype)
    weight = (torch.randn(EXPERTS, hidden, generator=generator) / hidden**0.5).to(dtype)
    b = torch.randn(EXPERTS, generator=generator).to(dtype) if bias else None
    c = torch.randn(EXPERTS, generator=generator) * 0.1 if correction else None
    return x, weight, b, c


@pytest.mark.parametrize("routing", ROUTINGS, ids=str)
@pytest.mark.parametrize(
    "dtype, logits_dtype",
    [(torch.bfloat16, None), (torch.bfloat16, torch.float32), (torch.float16, torch.bfloat16), (torch.float32, None)],
)
def test_op_is_routing_of_the_logits_rounded_to_logits_dtype(routing, dtype, logits_dtype):
    k, scoring, renormalize, correction, n_group, topk_group, group_score = routing
    x, weight, bias, correction_bias = routing_case(dtype, bias=True, correction=correction)
    weights, ids = ops.router_routing(
        x, weight, bias, k, scoring, renormalize, correction_bias, n_group, topk_group, group_score, logits_dtype
    )
    routing_args = (k, scoring, renormalize, correction_bias, n_group, topk_group, group_score)
    logits = ops.router_gemm(x, weight, bias, logits_dtype)
    assert logits.dtype == (logits_dtype or dtype)
    two_weights, two_ids = ops.topk_routing(logits, *routing_args)
    assert torch.equal(ids, two_ids) and torch.equal(weights, two_weights)  # bitwise the composition
    # Against the logits in float64, rounded once to the logits dtype (the same ids; the
    # weights within fp32 rounding, since the GEMM accumulates in fp32).
    exact_logits = (x.double() @ weight.double().t() + bias.double()).to(logits_dtype or dtype)
    want_weights, want_ids = ops.topk_routing(exact_logits, *routing_args)
    assert torch.equal(ids, want_ids)
    torch.testing.assert_close(weights, want_weights)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int64 and ids.shape == (x.shape[0], k)


def test_logits_dtype_decides_the_routing_of_near_ties():
    """Two experts whose fp32 logits differ below bf16's resolution: rounded to bf16 they
    tie and the lower index wins; kept in fp32 the larger one wins."""
    x = torch.ones(1, 8, dtype=torch.bfloat16)
    weight = torch.zeros(4, 8, dtype=torch.bfloat16)
    weight[1, 0] = 1.0
    weight[2, 0] = 1.0
    weight[2, 1] = 2.0**-10
    bias = torch.zeros(4, dtype=torch.bfloat16)
    _, ids_bf16 = ops.router_routing(x, weight, bias, 1)
    _, ids_fp32 = ops.router_routing(x, weight, bias, 1, logits_dtype=torch.float32)
    assert ids_bf16.tolist() == [[1]] and ids_fp32.tolist() == [[2]]


def test_no_tokens():
    x, weight, bias, _ = routing_case(torch.bfloat16, bias=True, correction=False, tokens=0)
    weights, ids = ops.router_routing(x, weight, bias, 2)
    assert weights.shape == (0, 2) and ids.shape == (0, 2)


@pytest.mark.parametrize("routing", ROUTINGS[::2], ids=str)
def test_opcheck(routing):
    k, scoring, renormalize, correction, n_group, topk_group, group_score = routing
    x, weight, bias, correction_bias = routing_case(torch.bfloat16, bias=True, correction=correction)
    args = (x, weight, bias, k, scoring, renormalize, correction_bias, n_group, topk_group, group_score, torch.float32)
    torch.library.opcheck(ops.router_routing, args)
    torch.library.opcheck(ops.router_routing, (x, weight, None, k))


def bad_inputs():
    """(keyword overrides of a good call, the op whose message it must raise)."""
    x, weight, bias, correction = routing_case(torch.bfloat16, bias=True, correction=True)
    return [
        (dict(x=x[0]), "router_gemm"),
        (dict(weight=weight[:, :8]), "router_gemm"),
        (dict(weight=weight.float()), "router_gemm"),
        (dict(bias=bias[:3]), "router_gemm"),
        (dict(logits_dtype=torch.float64), "router_gemm"),
        (dict(k=0), "topk_routing"),
        (dict(k=EXPERTS + 1), "topk_routing"),
        (dict(scoring="tanh"), "topk_routing"),
        (dict(correction_bias=correction[:3]), "topk_routing"),
        (dict(n_group=3), "topk_routing"),
        (dict(n_group=4, topk_group=5), "topk_routing"),
        (dict(n_group=4, topk_group=1, k=5), "topk_routing"),
        (dict(group_score="mean"), "topk_routing"),
    ]


@pytest.mark.parametrize("index", range(len(bad_inputs())))
def test_bad_inputs_get_the_two_ops_messages(index):
    x, weight, bias, correction = routing_case(torch.bfloat16, bias=True, correction=True)
    good = dict(
        x=x, weight=weight, bias=bias, k=2, scoring="sigmoid", renormalize=True, correction_bias=correction,
        n_group=1, topk_group=1, group_score="top2_sum", logits_dtype=None,
    )  # fmt: skip
    overrides, op = bad_inputs()[index]
    call = {**good, **overrides}
    # The message the two ops give for the same mistake.
    with pytest.raises(ValueError) as composed:
        logits = ops.router_gemm(call["x"], call["weight"], call["bias"], call["logits_dtype"])
        ops.topk_routing(logits, *[call[n] for n in ("k", "scoring", "renormalize", "correction_bias")],
                         *[call[n] for n in ("n_group", "topk_group", "group_score")])  # fmt: skip
    assert str(composed.value).startswith(op + ":")
    for run in (lambda: ops.router_routing(*call.values()), lambda: fake_call(call)):
        with pytest.raises(ValueError) as fused:
            run()
        assert str(fused.value) == str(composed.value)


def fake_call(call):
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode(allow_non_fake_inputs=True):
        return ops.router_routing(*call.values())


# ------------------------------------------------------------------------------ pass


def run(module, x, **config):
    backend, out, graphs = compile_and_run(module, x, config=fusion_passes.PassConfig(**config))
    with torch.no_grad():
        ref = module(x)
    return backend.report.counts, out, ref, graphs


def calls(graphs, target):
    return [n for g in graphs for n in g.nodes if n.target is target]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_every_routing_form_is_fused_and_agrees_with_the_two_ops(form, dtype):
    torch.manual_seed(0)
    module = Router(form, bias=form == "topk_softmax").to(dtype)
    x = torch.randn(7, H, dtype=dtype)
    counts, (w, ids), _, graphs = run(module, x)
    assert counts["router_gemm"] == counts["nan_safe_routing"] == counts["router_routing"] == 1
    assert not calls(graphs, ops.router_gemm) and not calls(graphs, ops.topk_routing)
    (call,) = calls(graphs, ops.router_routing)
    assert call.args[-1] is None  # the logits in the router's own dtype
    two_counts, (two_w, two_ids), _, _ = run(module, x, router_routing=False)
    assert two_counts["router_routing"] == 0
    assert torch.equal(ids, two_ids) and torch.equal(w, two_w)  # bitwise the two ops' result


def test_fused_graph():
    module = Router("sigmoid_bias")
    _, _, _, graphs = run(module, torch.randn(5, H))
    assert region(graphs, ops.router_routing) == (
        "router_routing_0: (f32[s, 2], i64[s, 2]) = fusion_passes.router_routing(input_1, input_0, None, 2, "
        "'sigmoid', True, input_2, 1, 1, 'top2_sum', None)\n"
        "getitem_0: f32[s, 2] = getitem(router_routing_0, 0)\n"
        "getitem_1: i64[s, 2] = getitem(router_routing_0, 1)\n"
        "mul_0: f32[s, 2] = aten.mul.Tensor(getitem_0, 2.5)"
    )


class LogitsAlsoReturned(Router):
    """A router whose logits also leave the graph (a model returning router logits for an
    auxiliary load-balancing loss): the logits must be materialized, so no fusion."""

    def forward(self, x):
        logits = self.gate(x)
        p = torch.softmax(logits, dim=-1, dtype=torch.float)
        w, ids = torch.topk(p, self.k, dim=-1)
        return w / w.sum(dim=-1, keepdim=True), ids, logits


def test_logits_that_feed_something_else_are_not_fused():
    module = LogitsAlsoReturned("softmax_topk")
    x = torch.randn(5, H)
    counts, out, ref, graphs = run(module, x)
    assert counts["router_gemm"] == counts["nan_safe_routing"] == 1 and counts["router_routing"] == 0
    assert len(calls(graphs, ops.router_gemm)) == 1 and len(calls(graphs, ops.topk_routing)) == 1
    for o, r in zip(out, ref):
        torch.testing.assert_close(o, r)


def test_switched_off():
    counts, _, _, graphs = run(Router("softmax_topk"), torch.randn(5, H), router_routing=False)
    assert counts["router_routing"] == 0 and len(calls(graphs, ops.router_gemm)) == 1


def test_needs_both_passes_before_it():
    for off in ("router_gemm", "nan_safe_routing"):
        counts, _, _, graphs = run(Router("softmax_topk"), torch.randn(5, H), **{off: False})
        assert counts["router_routing"] == 0 and not calls(graphs, ops.router_routing)


@pytest.mark.parametrize("name", [name for name in MODELS if name != "llama"])
def test_built_in_models_fuse_every_moe_layer(name):
    layers = 2
    model = build_model(name, layers)
    (ids,) = example_inputs(model, 6)
    backend, out, graphs = compile_and_run(model, ids)
    counts = backend.report.counts
    assert counts["router_routing"] == counts["router_gemm"] == counts["nan_safe_routing"] == layers
    assert len(calls(graphs, ops.router_routing)) == layers and not calls(graphs, ops.topk_routing)
    with torch.no_grad():
        torch.testing.assert_close(out, model(ids))
