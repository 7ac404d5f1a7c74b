"""slice_before_allreduce and allreduce_rmsnorm on the forms real graphs take:
functional collectives, in-place dist.all_reduce, DTensor, a serving engine's own
all-reduce op; every RMSNorm form; and the cases that must not be rewritten."""

import pytest
import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
import torch.nn.functional as F
from helpers import compile_and_run

import fusion_passes
from fusion_passes import ops
from fusion_passes.models import fake_tp_group
from fusion_passes.testing import assert_matches

H, PADDED = 80, 256


def rms_norm(form, h, weight, eps=1e-6):
    if form == "functional":
        return F.rms_norm(h, (h.shape[-1],), weight, eps)
    t = h.float()
    normed = t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)
    if form == "hf":
        return weight * normed.to(h.dtype)
    if form == "gpt_oss":
        return (normed * weight).to(h.dtype)
    raise AssertionError(form)


def all_reduce(x, how, group):
    if how == "functional":
        return funcol.all_reduce(x, "sum", group)
    if how == "inplace":
        x = x.clone()
        dist.all_reduce(x, group=group)
        return x
    if how == "custom":
        return torch.ops.fusion_passes_test.all_reduce(x, group.group_name)
    raise AssertionError(how)


class Block(torch.nn.Module):
    """partial -> all-reduce -> [slice] -> (+ residual) -> RMSNorm, like a TP layer's end."""

    def __init__(self, group, norm="hf", how="functional", padded=False, residual=True, slicing=None, dtype=torch.float32):
        super().__init__()
        self.group, self.norm, self.how, self.padded, self.residual = group, norm, how, padded, residual
        self.slicing = slicing or (lambda r: r[..., :H])
        weight_dtype = torch.float32 if norm == "gpt_oss" else dtype
        self.weight = torch.nn.Parameter(torch.rand(H, dtype=weight_dtype) + 0.5)
        self.proj = torch.nn.Linear(H, PADDED if padded else H, bias=False, dtype=dtype)

    def forward(self, x, res):
        r = all_reduce(self.proj(x), self.how, self.group)
        if self.padded:
            r = self.slicing(r)
        h = r + res if self.residual else r
        return rms_norm(self.norm, h, self.weight), h


@pytest.fixture
def group():
    with fake_tp_group(2) as g:
        yield g


def counts_for(module, dtype=torch.float32, config=None, tokens=5):
    x, res = torch.randn(tokens, H, dtype=dtype), torch.randn(tokens, H, dtype=dtype)
    backend, _, graphs = compile_and_run(module, x, res, config=config, codegen=False)
    return backend.report.counts, graphs


@pytest.mark.parametrize("norm", ["hf", "gpt_oss", "functional"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("residual", [True, False])
def test_every_rmsnorm_form_fuses(group, norm, dtype, residual):
    counts, graphs = counts_for(Block(group, norm=norm, residual=residual, dtype=dtype), dtype)
    assert counts["allreduce_rmsnorm"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.fused_allreduce_rmsnorm]
    assert (call.args[1] is not None) is residual
    assert call.args[3] == pytest.approx(1e-6, rel=1e-6)
    assert not [n for g in graphs for n in g.nodes if "all_reduce" in str(n.target)]


@pytest.mark.parametrize("how", ["functional", "inplace"])
def test_padded_moe_output_slices_first_then_fuses(group, how):
    counts, graphs = counts_for(Block(group, padded=True, how=how))
    assert counts["slice_before_allreduce"] == 1 and counts["allreduce_rmsnorm"] == 1
    (call,) = [n for g in graphs for n in g.nodes if n.target is ops.fused_allreduce_rmsnorm]
    assert call.meta["val"][0].shape[-1] == H  # the op reduces [T, H], not [T, Hp]


@pytest.mark.parametrize(
    "slicing",
    [
        lambda r: r[..., :H] + r[..., H : 2 * H],  # a consumer reads the padding
        lambda r: r[:, 1 : H + 1],  # does not start at 0
        lambda r: r[..., : 2 * H : 2],  # has a step
    ],
    ids=["reads-padding", "offset", "step"],
)
def test_slices_that_must_not_move(group, slicing):
    counts, _ = counts_for(Block(group, padded=True, slicing=slicing))
    assert counts["slice_before_allreduce"] == 0 and counts["allreduce_rmsnorm"] == 0


def test_slice_on_another_dim_does_not_move(group):
    class TokenSlice(torch.nn.Module):
        def forward(self, x):
            return funcol.all_reduce(x, "sum", group)[:3]

    backend, _, _ = compile_and_run(TokenSlice(), torch.randn(6, H), codegen=False, dynamic_dim0=False)
    assert backend.report.counts["slice_before_allreduce"] == 0


def test_not_a_sum_or_not_constant_eps_or_wrong_weight(group):
    class Max(Block):
        def forward(self, x, res):
            r = funcol.all_reduce(self.proj(x), "max", self.group)
            return rms_norm("hf", r + res, self.weight), r

    class NoWeightBroadcast(Block):
        def forward(self, x, res):
            h = funcol.all_reduce(self.proj(x), "sum", self.group) + res
            return rms_norm("hf", h, self.weight[:1]), h  # a [1] weight is not the hidden size

    for module in (Max(group), NoWeightBroadcast(group)):
        counts, _ = counts_for(module)
        assert counts["allreduce_rmsnorm"] == 0


def test_reduced_tensor_used_elsewhere_is_not_fused(group):
    class Leaky(Block):
        def forward(self, x, res):
            r = funcol.all_reduce(self.proj(x), "sum", self.group)
            return rms_norm("hf", r + res, self.weight), r.sum()

    counts, _ = counts_for(Leaky(group))
    assert counts["allreduce_rmsnorm"] == 0


@pytest.fixture(scope="module")
def engine_allreduce_op():
    """A serving engine's own all-reduce op, defined by the test."""
    lib = torch.library.Library("fusion_passes_test", "DEF")
    lib.define("all_reduce(Tensor x, str group_name) -> Tensor")
    lib.impl("all_reduce", lambda x, g: funcol.all_reduce(x, "sum", g).clone(), "CompositeExplicitAutograd")
    torch.library.register_fake("fusion_passes_test::all_reduce", lambda x, g: torch.empty_like(x), lib=lib)
    yield "fusion_passes_test::all_reduce"
    lib._destroy()


def test_engines_own_allreduce_op(group, engine_allreduce_op):
    module = Block(group, how="custom", padded=True)
    counts, _ = counts_for(module)
    assert counts["allreduce_rmsnorm"] == 0  # not recognised unless named
    config = fusion_passes.PassConfig(allreduce_ops=(engine_allreduce_op,))
    counts, graphs = counts_for(module, config=config)
    assert counts["slice_before_allreduce"] == 1 and counts["allreduce_rmsnorm"] == 1


def test_unknown_engine_op_is_a_clear_error(group):
    with pytest.raises(Exception, match="not a registered op"):
        counts_for(Block(group), config=fusion_passes.PassConfig(allreduce_ops=("nope::all_reduce",)))


def test_dtensor_rowwise_parallel_counts():
    """A model that was not sharded by hand: parallelize_module with Colwise/Rowwise."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    class MLPBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.up = torch.nn.Linear(H, 4 * H, bias=False)
            self.down = torch.nn.Linear(4 * H, H, bias=False)
            self.norm_weight = torch.nn.Parameter(torch.ones(H))

        def forward(self, x, res):
            h = self.down(F.silu(self.up(x))) + res
            return rms_norm("hf", h, self.norm_weight), h

    with fake_tp_group(2):
        mesh = init_device_mesh("cpu", (2,))
        model = parallelize_module(MLPBlock(), mesh, {"up": ColwiseParallel(), "down": RowwiseParallel()})
        x, res = torch.randn(5, H), torch.randn(5, H)
        backend, _, _ = compile_and_run(model, x, res, codegen=False)
    assert_matches(backend.report, allreduce_rmsnorm=1)


def test_eps_that_is_not_a_constant_is_not_fused(group):
    """dynamic=True makes a module's float eps a graph input; the op needs a constant."""

    class TensorEps(Block):
        def forward(self, x, res, eps):
            h = funcol.all_reduce(self.proj(x), "sum", self.group) + res
            t = h.float()
            return self.weight * (t * torch.rsqrt(t.pow(2).mean(-1, keepdim=True) + eps)).to(h.dtype), h

    x, res = torch.randn(5, H), torch.randn(5, H)
    backend, _, _ = compile_and_run(TensorEps(group), x, res, torch.tensor(1e-6), codegen=False)
    assert backend.report.counts["allreduce_rmsnorm"] == 0


class ResidualWrittenTwice(torch.nn.Module):
    """A built-in TP decoder whose layers write each sum twice, as some models do:
    ``h = norm(x + res); res = x + res``. The graph then holds two identical adds after
    every all-reduce, one feeding the norm and one the residual stream."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids):
        model = self.model
        res = model.embed(input_ids)
        h = model.layers[0].input_norm(res)
        for i, layer in enumerate(model.layers):
            x = layer.attn(h)
            h = layer.post_attn_norm(x + res)
            res = x + res
            x = layer.mlp(h)
            next_norm = model.layers[i + 1].input_norm if i + 1 < len(model.layers) else model.final_norm
            h = next_norm(x + res)
            res = x + res
        return h


@pytest.mark.parametrize("name", ["llama", "qwen3-moe"])
def test_a_sum_written_twice_is_one_add_and_still_fuses(name):
    from fusion_passes.models import build_model, example_inputs

    layers = 2
    with fake_tp_group(2) as group:
        model = ResidualWrittenTwice(build_model(name, layers, tp_group=group))
        (ids,) = example_inputs(model.model, 6)
        backend, _, graphs = compile_and_run(model, ids, codegen=False)
    assert_matches(backend.report, allreduce_rmsnorm=2 * layers + 1)
    functional = torch.ops._c10d_functional
    assert not [n for g in graphs for n in g.nodes if n.target is functional.all_reduce.default]
