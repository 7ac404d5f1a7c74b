// fusion_passes::topk_routing on CUDA: NaN-safe softmax/sigmoid top-k routing in one launch.
//
// Semantics: exactly those of `topk_routing_reference` in fusion_passes/ops.py (its docstring is
// the specification). In scope for the kernel: logits fp32/bf16/fp16, 1 <= E <= 512, k <= 32,
// correction bias fp32/bf16/fp16/fp64, and group-limited selection with n_group <= 32 (any
// group shape). Anything else valid runs `topk_routing_composite` below, the reference written
// with ATen ops, so valid input never errors. Sigmoid forms are bitwise equal to the reference
// run by torch on the GPU, ids and weights; softmax forms as docs/ops.md says.
//
// The per-row code is `route_row` in csrc/topk_select.cuh, shared with the fused router +
// routing kernel; this file holds the kernel around it (a row of global memory per warp), the
// dispatch over its template variants, the argument checks and the composite.
//
// Design: one warp per token row, kRowsPerBlock rows per block, no shared memory.
//  * Lane l owns the VPL contiguous experts [l*VPL, (l+1)*VPL) in registers; VPL is a template
//    bucket (1, 2, 4, 6, 8, 12, 16) >= ceil(E/32), so every register array is indexed with
//    compile-time constants. Loads are 16 bytes (or the widest that divides VPL) when the row
//    is aligned, element-wise otherwise (any E, any row stride).
//  * Every expert becomes one unsigned *entry*: a selection key that orders like the selection
//    score, above the bits of 511 - e. Entries are distinct, a larger one is the better expert,
//    and equal keys go to the lower index, so the top-k entries of the row are the answer.
//    Keys: finite scores map to an order-preserving integer (+0 and -0 equal), a NaN logit or
//    NaN score to kInvalidKey (1), below every finite score; entry 0 means taken. Slots past E
//    hold NaN: invalid experts with indices above every real one, so the E >= k real experts
//    always rank above them, and no slot needs a bounds test. Without a correction bias the
//    score is the logit itself, and for bf16/fp16 logits its 16-bit key is exact: the entry is
//    32 bits (key << 16) and one __reduce_max_sync finds the best expert. Otherwise (fp32
//    logits, or p + bias) the key takes 32 bits and the entry 64; the round reduces the keys,
//    and among the lanes that hold the best key the lowest wins (lane order is expert order),
//    as a ballot says.
//  * Each lane sorts its VPL entries once (Batcher's odd-even merge network, comparators past
//    VPL dropped), then k rounds: the warp's best head is the next expert, and the lane that
//    held it shifts its list by one (VPL independent selects, the new head one of them). Lane r
//    keeps the round-r entry, so the ids come out in descending order; all-invalid rows get
//    ids 0..k-1 like the reference.
//  * Groups (kGrouped): when a group is a power of two of whole lanes (DeepSeek-V3's 256 =
//    8 x 32: 4 lanes of 8), after the per-lane sort a lane's best two keys are its first two
//    entries and a butterfly over the group's lanes merges them; otherwise lane g scores group g
//    by scanning its experts in the row with the owners' expressions. Either way the best two
//    keys decode to their fp32 group terms (the selection score; for top2_sum without a bias
//    the probability, sigmoid_like_torch or softmax_group_term, so that groups rank as the
//    reference ranks them; invalid: -FLT_MAX), added without flushing as the reference adds
//    them, and each lane ranks its group against all n_group group keys (independent shuffles;
//    ties to the lower group). Experts of unkept groups get entry 0 (taken), so the k rounds
//    never see them and kept invalid experts still come last by index. The softmax max is
//    reduced before the groups are scored: the terms need it, and the row's largest logit may
//    sit in a dropped group.
//  * Weights: sigmoid p is torch's (libdevice expf, IEEE add and division: sigmoid_like_torch);
//    softmax p uses an exp within 1 ulp (range reduction, degree-7 polynomial; the
//    --use_fast_math __expf loses |t|*1e-7 relative) and IEEE division. Arithmetic that must
//    keep subnormals is inline PTX without .ftz (--use_fast_math flushes them in C++).
//    Renormalization adds the k lanes' weights left to right in rank order, as the reference;
//    a zero sum gives 1/k (rounded from double on the host, as Python does).
//  * Without a bias the keys decode back to the clamped logits: round 0 yields the softmax max,
//    lane r's entry its expert's logit, and for renormalized softmax weights, exp(x - max) / their
//    sum, the softmax denominator cancels: that path (the common one) has no pass over the row
//    after the rounds. Otherwise the softmax sum takes an exp of about 2 ulp (ex2.approx
//    corrected for the rounding of t*log2(e)) and a warp reduction; with a bias, p + bias of
//    every expert is needed before the rounds (the bias loaded together with the logits), and
//    lane r takes its expert's p or logit from the owner lane by shuffles.
//  * Programmatic dependent launch: the kernel is launched with programmatic stream
//    serialization and reads or writes global memory only after griddepcontrol.wait, which
//    returns once the grids before it have completed and their stores are visible. It releases
//    its own dependents right after that wait: they wait for this grid's completion in turn, so
//    the early release only lets their launch overlap this grid's work.
//
// NaN policy (as the reference): +-Inf logits and bias are clamped to +-FLT_MAX; a NaN logit is
// invalid (p = 0, ranked below every valid expert, among invalid ones by index); with a bias, a
// NaN bias makes the expert invalid too. NaN tests are bit tests, immune to fast-math.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include "topk_select.cuh"

#include <cfloat>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace {

using namespace fusion_passes::topk_select;

constexpr int kRowsPerBlock = 4;
constexpr int kThreadsPerBlock = kRowsPerBlock * kWarpSize;

struct RoutingParams {
  const void* logits;
  int64_t row_stride;  // in elements
  int64_t num_rows;
  RowSelection selection;
  float* weights;  // [T, k]
  int64_t* ids;    // [T, k]
};

// ------------------------------------------------------------------------------------- kernel

template <LogitFormat F, int VPL, bool kSigmoid, bool kHasBias, bool kGrouped>
__global__ void __launch_bounds__(kThreadsPerBlock) topk_routing_kernel(const RoutingParams p) {
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.num_rows) return;  // whole warps leave; nothing below synchronizes the block
  wait_for_prior_grids();
  release_dependent_grids();
  const int k = p.selection.k;
  route_row<F, VPL, kSigmoid, kHasBias, kGrouped>(static_cast<const LogitStorage<F>*>(p.logits) + row * p.row_stride,
                                                  p.selection, p.weights + row * k, p.ids + row * k);
}

// --------------------------------------------------------------------------------- dispatch

template <LogitFormat F, int VPL, bool kSigmoid, bool kHasBias, bool kGrouped>
void launch_kernel(const RoutingParams& params, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>((params.num_rows + kRowsPerBlock - 1) / kRowsPerBlock));
  config.blockDim = dim3(kThreadsPerBlock);
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, topk_routing_kernel<F, VPL, kSigmoid, kHasBias, kGrouped>, params));
}

template <LogitFormat F, int VPL, bool kGrouped>
void launch_for_scoring(const RoutingParams& params, bool sigmoid, cudaStream_t stream) {
  const bool has_bias = params.selection.bias != nullptr;
  if (sigmoid) {
    has_bias ? launch_kernel<F, VPL, true, true, kGrouped>(params, stream)
             : launch_kernel<F, VPL, true, false, kGrouped>(params, stream);
  } else {
    has_bias ? launch_kernel<F, VPL, false, true, kGrouped>(params, stream)
             : launch_kernel<F, VPL, false, false, kGrouped>(params, stream);
  }
}

template <LogitFormat F, int VPL>
void launch_for_groups(const RoutingParams& params, bool grouped, bool sigmoid, cudaStream_t stream) {
  grouped ? launch_for_scoring<F, VPL, true>(params, sigmoid, stream)
          : launch_for_scoring<F, VPL, false>(params, sigmoid, stream);
}

template <LogitFormat F>
void launch_for_format(RoutingParams& params, const at::Tensor& logits, bool grouped, bool sigmoid,
                       cudaStream_t stream) {
  RowSelection& selection = params.selection;
  const int vpl = experts_per_lane(selection.num_experts);
  const int element_size = static_cast<int>(logits.element_size());
  const int width = std::min(16 / element_size, vpl & -vpl);  // as vector_width<F, VPL>()
  selection.vector_loads = width > 1 && selection.num_experts % width == 0 && params.row_stride % width == 0 &&
                           reinterpret_cast<uintptr_t>(params.logits) % (width * element_size) == 0;
  switch (vpl) {
    case 1: return launch_for_groups<F, 1>(params, grouped, sigmoid, stream);
    case 2: return launch_for_groups<F, 2>(params, grouped, sigmoid, stream);
    case 4: return launch_for_groups<F, 4>(params, grouped, sigmoid, stream);
    case 6: return launch_for_groups<F, 6>(params, grouped, sigmoid, stream);
    case 8: return launch_for_groups<F, 8>(params, grouped, sigmoid, stream);
    case 12: return launch_for_groups<F, 12>(params, grouped, sigmoid, stream);
    default: return launch_for_groups<F, 16>(params, grouped, sigmoid, stream);
  }
}

// ------------------------------------------------------------------------- checks and fallback

// The Python spelling of shapes, dtypes and strings, so that messages match fusion_passes/ops.py.
// Messages are built with std::string and std::to_string and handed to TORCH_CHECK_VALUE as one
// std::string: no iostreams, whose number formatting crashed when compiled into the extension by
// the device's host compiler (/opt/gcc) and run against the process's libstdc++.
std::string python_tuple(c10::IntArrayRef shape) {
  std::string out = "(";
  for (size_t i = 0; i < shape.size(); ++i) out += (i ? ", " : "") + std::to_string(shape[i]);
  return out + (shape.size() == 1 ? ",)" : ")");
}

std::string python_dtype(at::ScalarType type) {
  switch (type) {
    case at::kByte: return "torch.uint8";
    case at::kChar: return "torch.int8";
    case at::kShort: return "torch.int16";
    case at::kInt: return "torch.int32";
    case at::kLong: return "torch.int64";
    case at::kBool: return "torch.bool";
    case at::kUInt16: return "torch.uint16";
    case at::kUInt32: return "torch.uint32";
    case at::kUInt64: return "torch.uint64";
    case at::kComplexHalf: return "torch.complex32";
    case at::kComplexFloat: return "torch.complex64";
    case at::kComplexDouble: return "torch.complex128";
    case at::kQInt8: return "torch.qint8";
    case at::kQUInt8: return "torch.quint8";
    case at::kQInt32: return "torch.qint32";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kHalf: return "torch.float16";
    case at::kBFloat16: return "torch.bfloat16";
    default: return std::string("torch.") + c10::toString(type);
  }
}

std::string python_repr(const std::string& text) {
  const bool double_quotes = text.find('\'') != std::string::npos && text.find('"') == std::string::npos;
  const char quote = double_quotes ? '"' : '\'';
  std::string out(1, quote);
  for (const char c : text) {
    if (c == '\\') out += "\\\\";
    else if (c == quote) out += std::string("\\") + quote;
    else if (c == '\n') out += "\\n";
    else if (c == '\r') out += "\\r";
    else if (c == '\t') out += "\\t";
    else out += c;
  }
  return out + quote;
}

void check_topk_routing_args(const at::Tensor& logits, int64_t k, const std::string& scoring,
                             const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
                             const std::string& group_score) {
  TORCH_CHECK_VALUE(logits.dim() == 2,
                    std::string("topk_routing: logits must be 2-D [T, E], got shape ") + python_tuple(logits.sizes()));
  TORCH_CHECK_VALUE(at::isFloatingType(logits.scalar_type()),
                    "topk_routing: logits must be floating point, got " + python_dtype(logits.scalar_type()));
  const int64_t num_experts = logits.size(1);
  TORCH_CHECK_VALUE(num_experts >= 1, "topk_routing: logits must have at least one expert column");
  TORCH_CHECK_VALUE(1 <= k && k <= num_experts, "topk_routing: need 1 <= k <= E, got k=" + std::to_string(k) +
                                                    ", E=" + std::to_string(num_experts));
  TORCH_CHECK_VALUE(scoring == "softmax" || scoring == "sigmoid",
                    "topk_routing: scoring must be one of ('softmax', 'sigmoid'), got " + python_repr(scoring));
  if (correction_bias.has_value()) {
    const at::Tensor& bias = *correction_bias;
    TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == num_experts,
                      "topk_routing: correction_bias must be [E]=" + std::to_string(num_experts) + ", got shape " +
                          python_tuple(bias.sizes()));
    TORCH_CHECK_VALUE(at::isFloatingType(bias.scalar_type()),
                      "topk_routing: correction_bias must be floating point, got " + python_dtype(bias.scalar_type()));
    TORCH_CHECK_VALUE(bias.device() == logits.device(), "topk_routing: correction_bias is on another device than logits");
  }
  TORCH_CHECK_VALUE(n_group >= 1, "topk_routing: n_group must be >= 1, got n_group=" + std::to_string(n_group));
  TORCH_CHECK_VALUE(num_experts % n_group == 0, "topk_routing: E must be divisible by n_group, got E=" +
                                                    std::to_string(num_experts) + ", n_group=" + std::to_string(n_group));
  TORCH_CHECK_VALUE(1 <= topk_group && topk_group <= n_group,
                    "topk_routing: need 1 <= topk_group <= n_group, got topk_group=" + std::to_string(topk_group) +
                        ", n_group=" + std::to_string(n_group));
  TORCH_CHECK_VALUE(k <= topk_group * (num_experts / n_group),
                    "topk_routing: need k <= topk_group * E / n_group, got k=" + std::to_string(k) +
                        ", topk_group=" + std::to_string(topk_group) + ", E=" + std::to_string(num_experts) +
                        ", n_group=" + std::to_string(n_group));
  TORCH_CHECK_VALUE(group_score == "top2_sum" || group_score == "max",
                    "topk_routing: group_score must be one of ('top2_sum', 'max'), got " + python_repr(group_score));
}

at::Tensor clamp_infinities(const at::Tensor& t) {
  const at::Tensor x = t.to(at::kFloat);
  return at::where(at::isinf(x), at::where(x > 0, FLT_MAX, -FLT_MAX), x);
}

// Step 4 of the reference: [T, E] bool, the experts of each row's topk_group best groups.
at::Tensor kept_experts(const at::Tensor& group_terms, const at::Tensor& valid, int64_t n_group, int64_t topk_group,
                        bool group_max) {
  const int64_t num_rows = group_terms.size(0);
  const int64_t group_size = group_terms.size(1) / n_group;
  const at::Tensor grouped =
      group_terms.masked_fill(at::logical_not(valid), -FLT_MAX).view({num_rows, n_group, group_size});
  at::Tensor group_scores;
  if (group_max || group_size == 1) {
    group_scores = grouped.amax({-1});
  } else {
    const at::Tensor top2 = std::get<0>(grouped.topk(2, -1));
    group_scores = top2.select(-1, 0) + top2.select(-1, 1);
  }
  const at::Tensor kept_groups =
      std::get<1>(group_scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true)).narrow(1, 0, topk_group);
  const at::Tensor kept =
      at::zeros({num_rows, n_group}, group_terms.options().dtype(at::kBool)).scatter_(1, kept_groups, true);
  return kept.repeat_interleave(group_size, 1);
}

// The reference of fusion_passes/ops.py step by step in ATen ops, for inputs outside the
// kernel's scope (E > 512, k > 32, fp64 or other logit dtypes).
std::tuple<at::Tensor, at::Tensor> topk_routing_composite(const at::Tensor& logits, int64_t k, bool sigmoid,
                                                          bool renormalize,
                                                          const std::optional<at::Tensor>& correction_bias,
                                                          int64_t n_group, int64_t topk_group, bool group_max) {
  const at::Tensor x = clamp_infinities(logits);
  at::Tensor valid = at::logical_not(at::isnan(x));
  at::Tensor prob;
  at::Tensor shifted;       // softmax: x - row max
  at::Tensor unnormalized;  // softmax: exp(shifted)
  if (!sigmoid) {
    const at::Tensor masked = x.masked_fill(at::logical_not(valid), -INFINITY);
    const at::Tensor row_max =
        masked.amax({-1}, /*keepdim=*/true).masked_fill(at::logical_not(valid.any(-1, /*keepdim=*/true)), 0.0);
    shifted = masked - row_max;
    unnormalized = at::exp(shifted);
    prob = unnormalized / unnormalized.sum({-1}, /*keepdim=*/true).clamp_min(FLT_MIN);
  } else {
    prob = at::sigmoid(x).masked_fill(at::logical_not(valid), 0.0);
  }
  at::Tensor score = x;
  if (correction_bias.has_value()) {
    score = clamp_infinities(prob + clamp_infinities(*correction_bias));
    valid = valid.logical_and(at::logical_not(at::isnan(score)));
  }
  const at::Tensor selection_key = score.masked_fill(at::logical_not(valid), -INFINITY);
  at::Tensor order = std::get<1>(selection_key.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true));
  if (n_group > 1) {
    at::Tensor group_terms = score;
    if (!correction_bias.has_value() && !group_max) {
      group_terms = sigmoid ? prob : at::where(shifted < kSoftmaxGroupTermFloor, 0.0, unnormalized);
    }
    const at::Tensor dropped =
        at::logical_not(kept_experts(group_terms, valid, n_group, topk_group, group_max).gather(1, order)).to(at::kByte);
    order = order.gather(1, std::get<1>(dropped.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false)));
  }
  const at::Tensor ids = order.narrow(1, 0, k).contiguous();
  at::Tensor weights = prob.gather(1, ids);
  if (renormalize) {
    at::Tensor total = weights.narrow(1, 0, 1);
    for (int64_t r = 1; r < k; ++r) total = total + weights.narrow(1, r, 1);  // left to right, as the reference
    weights = at::where(total > 0, weights / at::where(total > 0, total, at::ones_like(total)),
                        1.0 / static_cast<double>(k));
  }
  return {weights.contiguous(), ids};
}

std::tuple<at::Tensor, at::Tensor> topk_routing_cuda(const at::Tensor& logits, int64_t k, c10::string_view scoring_view,
                                                     bool renormalize, const std::optional<at::Tensor>& correction_bias,
                                                     int64_t n_group, int64_t topk_group,
                                                     c10::string_view group_score_view) {
  const std::string scoring(scoring_view.data(), scoring_view.size());
  const std::string group_score(group_score_view.data(), group_score_view.size());
  check_topk_routing_args(logits, k, scoring, correction_bias, n_group, topk_group, group_score);
  const bool sigmoid = scoring == "sigmoid";
  const bool group_max = group_score == "max";
  const c10::cuda::CUDAGuard device_guard(logits.device());
  const int64_t num_rows = logits.size(0);
  const int64_t num_experts = logits.size(1);

  const at::ScalarType type = logits.scalar_type();
  const bool logits_in_scope = type == at::kFloat || type == at::kBFloat16 || type == at::kHalf;
  const bool grouped = n_group > 1;
  // Any group shape the op accepts with n_group <= 32 (one lane a group) and E <= 512.
  if (!logits_in_scope || !routing_in_scope(num_experts, k, scoring, correction_bias, n_group, topk_group,
                                            group_score, logits.device())) {
    // One std::string argument: c10::str passes it through without an ostream (see above).
    const std::string note =
        "fusion_passes::topk_routing: an input outside the CUDA kernel's scope (E > 512, k > 32, n_group > 32, "
        "or a logit dtype other than fp32/bf16/fp16) runs the ATen composite of the reference: correct, slower.";
    TORCH_WARN_ONCE(note);
    return topk_routing_composite(logits, k, sigmoid, renormalize, correction_bias, n_group, topk_group, group_max);
  }

  at::Tensor weights = at::empty({num_rows, k}, logits.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({num_rows, k}, logits.options().dtype(at::kLong));
  if (num_rows == 0) return {weights, ids};

  const at::Tensor rows = logits.stride(1) == 1 ? logits : logits.contiguous();
  at::Tensor bias;
  RoutingParams params{};
  params.logits = rows.data_ptr();
  params.row_stride = num_rows > 1 ? rows.stride(0) : num_experts;
  params.num_rows = num_rows;
  RowSelection& selection = params.selection;
  selection.num_experts = static_cast<int>(num_experts);
  selection.k = static_cast<int>(k);
  if (correction_bias.has_value()) {
    bias = correction_bias->contiguous();
    selection.bias = bias.data_ptr();
    selection.bias_format = bias_format_of(bias.scalar_type());
  }
  selection.renormalize = renormalize;
  selection.uniform_weight = static_cast<float>(1.0 / static_cast<double>(k));
  selection.n_group = static_cast<int>(n_group);
  selection.group_size = static_cast<int>(num_experts / n_group);
  selection.topk_group = static_cast<int>(topk_group);
  selection.lanes_per_group = grouped ? lanes_per_group(selection.num_experts, static_cast<int>(n_group)) : 0;
  selection.group_max = group_max;
  params.weights = weights.data_ptr<float>();
  params.ids = ids.data_ptr<int64_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (type) {
    case at::kFloat: launch_for_format<LogitFormat::kFloat32>(params, rows, grouped, sigmoid, stream); break;
    case at::kBFloat16: launch_for_format<LogitFormat::kBFloat16>(params, rows, grouped, sigmoid, stream); break;
    default: launch_for_format<LogitFormat::kFloat16>(params, rows, grouped, sigmoid, stream); break;
  }
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusion_passes, CUDA, m) {
  m.impl("topk_routing", &topk_routing_cuda);
}
