// fusion_passes::router_routing on CUDA: the router GEMM and the routing of its logits in one
// kernel at decode sizes, the two kernels (router_gemm, then topk_routing) above a token bound.
//
// Semantics: exactly topk_routing(router_gemm(x, weight, bias, logits_dtype), k, ...), bitwise.
// The fused kernel composes the two kernels' own device code: gemm_tile() of
// csrc/router_gemm_tile.cuh computes and rounds every logit as the router GEMM kernel does (the
// same K split, fixed by H, and the same order of sums; the tile shape never changes the bits),
// and route_row() of csrc/topk_select.cuh routes each row as the routing kernel does (the same
// experts-per-lane bucket, so the same order of its warp sums). So the result equals the two
// kernels' wherever the router GEMM op would run its kernel (not cuBLAS) for this T.
//
// The problem: a token's logit row is spread over the clusters of several CTAs. The GEMM's
// grid is (cluster_k, E tiles, T tiles), clustered along K only, and routing needs the whole
// row. A cluster holding a whole row would need cluster_k * E tiles CTAs (64 for E = 128 at
// H = 2880, above the 16 an H100 cluster can hold), or fewer, larger CTAs that read the weight
// through fewer SMs (slower than the two kernels). Instead:
//   * every CTA runs the GEMM tile (16 experts x 8 tokens, the 1x1 tile, so that each of the 8
//     warps of the CTA that routes a T tile has at most one row to route) and stores its
//     finished logits, rounded to logits_dtype exactly as router_gemm stores them, into a
//     [T, E] workspace (the caching allocator's, per call: stream-ordered, no initialization);
//   * then __syncthreads() and one atom.add.acq_rel.gpu by thread 0 on the T tile's arrival
//     counter (release: cumulative over the CTA's stores, which bar.sync ordered before it);
//   * the CTA that arrives last (cluster_k * E tiles arrivals) resets the counter to 0 and,
//     after bar.sync (its threads' loads follow the acquire), routes the tile's rows from the
//     workspace (L2) with route_row, one warp per token. No CTA ever waits on another.
// Latency over the GEMM alone: one L2 round trip for the atomic, one for the rows, and one
// row's routing; against the two kernels it saves the routing kernel's launch, its wait for the
// GEMM grid's completion and its own drain (measured by `fusion-passes bench router-gemm
// --routing`: fused_kernel vs two_kernels).
//
// Counters: g_arrivals, a static device array, zero when the module loads; every launch takes
// one counter per T tile from a ring (a host atomic, so concurrent calls on other streams get
// other counters, and each call captured in a CUDA graph keeps its own), and the last arriver
// returns it to 0, so no memset runs and nothing needs a reset between calls or graph replays.
// A counter is reused after kCounters more T tiles have been launched; only two launches
// running at the same time on one counter would race (kCounters / T tiles calls apart, e.g.
// two graphs captured 2048 calls of T <= 64 apart replayed concurrently on two streams).
//
// Programmatic dependent launch: gemm_tile releases the dependents at every CTA's start and
// executes griddepcontrol.wait before it reads x and the bias; the counters and the workspace
// are touched only after that wait (so an early-started next launch never sees this one's), and
// every CTA has waited before it exits.
//
// Dispatch (router_routing_cuda): the fused kernel for bf16/fp16 x and weight whose router GEMM
// runs the kernel at this T (router_gemm_tile::kernel_serves), logits in x's dtype or fp32, every
// routing argument the routing kernel takes (topk_select::routing_in_scope: k <= 32, E <= 512,
// n_group <= 32, correction bias fp32/bf16/fp16/fp64), and T up to the fused bound: by default the largest T whose grid fits in
// one wave of two CTAs an SM, fusion_passes::_router_routing_set_max_tokens replaces it,
// _router_routing_fused_max_tokens(H, E) reads it, and _router_routing_set_path("fused" |
// "two_kernels" | "auto") forces a path for tests and benchmarks. Every other call, invalid ones
// included, runs the two ops through the dispatcher, so their checks give their messages.

#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "router_gemm_tile.cuh"
#include "topk_select.cuh"

#include <atomic>
#include <cstdint>
#include <optional>
#include <string>
#include <tuple>

namespace {

namespace gemm = fusion_passes::router_gemm_tile;
using namespace fusion_passes::topk_select;

constexpr int kTileTokens = 8;  // the 1x1 GEMM tile: 16 experts x 8 tokens, a token per warp
using FusedTile = gemm::Tile<1, 1>;
static_assert(FusedTile::kTokens == kTileTokens && kTileTokens == gemm::kWarps, "one row per warp to route");

constexpr int kCounters = 1 << 14;
__device__ unsigned int g_arrivals[kCounters];  // zero at module load; every launch leaves its own at zero

enum class Path : int { kAuto = 0, kFused = 1, kTwoKernels = 2 };
std::atomic<int64_t> g_max_tokens{-1};  // -1: one wave (see fused_max_tokens)
// Two kernels by default: measured on an H100, the fused kernel is no faster at T <= 16 and
// slower above (docs/notes/router_gemm.md, v12; docs/benchmarks.md, 2026-12-07 13:06).
std::atomic<int> g_path{static_cast<int>(Path::kTwoKernels)};
std::atomic<uint32_t> g_next_counter{0};

struct FusedParams {
  gemm::RouterGemmParams gemm;  // out: the [T, E] logits workspace in logits_dtype
  RowSelection selection;
  float* weights;  // [T, k]
  int64_t* ids;    // [T, k]
  int counter_base;  // g_arrivals[counter_base + T tile]
};

__device__ __forceinline__ unsigned int add_acq_rel_gpu(unsigned int* counter, unsigned int v) {
  unsigned int before;
  asm volatile("atom.add.acq_rel.gpu.global.u32 %0, [%1], %2;" : "=r"(before) : "l"(counter), "r"(v) : "memory");
  return before;
}

template <typename Elem, LogitFormat F, int VPL, bool kSigmoid, bool kHasBias, bool kGrouped>
__global__ void __launch_bounds__(gemm::kThreads, 2) router_routing_kernel(const FusedParams p) {
  gemm::gemm_tile<Elem, 1, 1>(p.gemm);  // releases the dependents, waits for the prior grids

  __shared__ bool routes;  // this CTA arrived last at its T tile
  __syncthreads();         // the CTA's workspace stores precede thread 0's release
  if (threadIdx.x == 0) {
    unsigned int* counter = g_arrivals + p.counter_base + blockIdx.z;
    const unsigned int arrivals = gridDim.x * gridDim.y;
    routes = add_acq_rel_gpu(counter, 1) + 1 == arrivals;
    if (routes) atomicExch(counter, 0u);  // every arrival is in: back to zero for the ring's next user
  }
  __syncthreads();  // the routing warps' loads follow thread 0's acquire
  if (!routes) return;
  const int token = blockIdx.z * kTileTokens + threadIdx.x / kWarpSize;
  if (token >= p.gemm.tokens) return;  // whole warps leave; nothing below synchronizes the block
  const int64_t row = token;
  route_row<F, VPL, kSigmoid, kHasBias, kGrouped>(
      static_cast<const LogitStorage<F>*>(p.gemm.out) + row * p.gemm.experts, p.selection,
      p.weights + row * p.selection.k, p.ids + row * p.selection.k);
}

// --------------------------------------------------------------------------------- dispatch

template <typename Elem, LogitFormat F, int VPL, bool kSigmoid, bool kHasBias, bool kGrouped>
void launch_kernel(const FusedParams& p, cudaStream_t stream) {
  gemm::launch_clustered<FusedTile::kExperts, FusedTile::kTokens>(
      router_routing_kernel<Elem, F, VPL, kSigmoid, kHasBias, kGrouped>, p, p.gemm, FusedTile::kSmemBytes, stream);
}

template <typename Elem, LogitFormat F, int VPL>
void launch_for_flags(const FusedParams& p, bool sigmoid, bool grouped, cudaStream_t stream) {
  const bool has_bias = p.selection.bias != nullptr;
  if (grouped) {
    if (sigmoid) {
      has_bias ? launch_kernel<Elem, F, VPL, true, true, true>(p, stream)
               : launch_kernel<Elem, F, VPL, true, false, true>(p, stream);
    } else {
      has_bias ? launch_kernel<Elem, F, VPL, false, true, true>(p, stream)
               : launch_kernel<Elem, F, VPL, false, false, true>(p, stream);
    }
  } else {
    if (sigmoid) {
      has_bias ? launch_kernel<Elem, F, VPL, true, true, false>(p, stream)
               : launch_kernel<Elem, F, VPL, true, false, false>(p, stream);
    } else {
      has_bias ? launch_kernel<Elem, F, VPL, false, true, false>(p, stream)
               : launch_kernel<Elem, F, VPL, false, false, false>(p, stream);
    }
  }
}

template <typename Elem, LogitFormat F>
void launch_for_vpl(const FusedParams& p, bool sigmoid, bool grouped, cudaStream_t stream) {
  switch (experts_per_lane(p.selection.num_experts)) {  // the routing kernel's bucket
    case 1: return launch_for_flags<Elem, F, 1>(p, sigmoid, grouped, stream);
    case 2: return launch_for_flags<Elem, F, 2>(p, sigmoid, grouped, stream);
    case 4: return launch_for_flags<Elem, F, 4>(p, sigmoid, grouped, stream);
    case 6: return launch_for_flags<Elem, F, 6>(p, sigmoid, grouped, stream);
    case 8: return launch_for_flags<Elem, F, 8>(p, sigmoid, grouped, stream);
    case 12: return launch_for_flags<Elem, F, 12>(p, sigmoid, grouped, stream);
    default: return launch_for_flags<Elem, F, 16>(p, sigmoid, grouped, stream);
  }
}

// ---------------------------------------------------------------------------------- host

// The largest T the fused kernel takes by default: the grid of 1x1 tiles fits in one wave of
// two CTAs an SM (more tiles would make the weight's readers wait for a second wave, and the
// routing CTAs with them), at least one T tile; never above the router GEMM kernel's own bound.
int64_t fused_max_tokens(int64_t hidden, int64_t experts) {
  const int64_t setting = g_max_tokens.load(std::memory_order_relaxed);
  const int64_t gemm_bound = gemm::kernel_max_tokens(hidden, experts);
  if (setting >= 0) return std::min(setting, gemm_bound);
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  const int64_t ctas_per_tile = (int64_t{1} << gemm::cluster_shift_for(hidden)) * ((experts + 15) / 16);
  const int64_t one_wave = 2 * gemm::multiprocessor_count(device);
  const int64_t tiles = std::max<int64_t>(1, one_wave / std::max<int64_t>(1, ctas_per_tile));
  return std::min(tiles * kTileTokens, gemm_bound);
}

bool is_16_bit(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf; }

// Whether the fused kernel computes this call: valid arguments (anything else goes to the two
// ops, whose checks raise) that both kernels serve, logits in x's dtype or fp32, T within the
// bound of the path setting.
bool fused_serves(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias, int64_t k,
                  const std::string& scoring, const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                  int64_t topk_group, const std::string& group_score, std::optional<at::ScalarType> logits_dtype) {
  const Path path = static_cast<Path>(g_path.load(std::memory_order_relaxed));
  if (path == Path::kTwoKernels) return false;
  if (x.dim() != 2 || weight.dim() != 2 || x.size(1) != weight.size(1)) return false;
  if (!is_16_bit(x.scalar_type()) || weight.scalar_type() != x.scalar_type() || weight.device() != x.device()) {
    return false;
  }
  const int64_t experts = weight.size(0);
  if (bias.has_value() && !(bias->dim() == 1 && bias->size(0) == experts && bias->scalar_type() == x.scalar_type() &&
                            bias->device() == x.device())) {
    return false;
  }
  if (logits_dtype.has_value() && *logits_dtype != x.scalar_type() && *logits_dtype != at::kFloat) return false;
  if (!routing_in_scope(experts, k, scoring, correction_bias, n_group, topk_group, group_score, x.device())) {
    return false;
  }
  if (!gemm::kernel_serves(x, weight)) return false;  // T >= 1, E <= 512, H % 8 == 0, aligned rows
  const int64_t tokens = x.size(0);
  if ((tokens + kTileTokens - 1) / kTileTokens > std::min(gemm::kMaxTileRows, kCounters)) return false;
  return path == Path::kFused || tokens <= fused_max_tokens(x.size(1), experts);
}

std::tuple<at::Tensor, at::Tensor> two_kernels(const at::Tensor& x, const at::Tensor& weight,
                                               const std::optional<at::Tensor>& bias, int64_t k,
                                               c10::string_view scoring, bool renormalize,
                                               const std::optional<at::Tensor>& correction_bias, int64_t n_group,
                                               int64_t topk_group, c10::string_view group_score,
                                               std::optional<at::ScalarType> logits_dtype) {
  static const auto router_gemm =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusion_passes::router_gemm", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                            std::optional<at::ScalarType>)>();
  static const auto topk_routing =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("fusion_passes::topk_routing", "")
          .typed<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, int64_t, c10::string_view, bool,
                                                    const std::optional<at::Tensor>&, int64_t, int64_t,
                                                    c10::string_view)>();
  const at::Tensor logits = router_gemm.call(x, weight, bias, logits_dtype);
  return topk_routing.call(logits, k, scoring, renormalize, correction_bias, n_group, topk_group, group_score);
}

std::tuple<at::Tensor, at::Tensor> router_routing_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, int64_t k,
                                                       c10::string_view scoring_view, bool renormalize,
                                                       const std::optional<at::Tensor>& correction_bias,
                                                       int64_t n_group, int64_t topk_group,
                                                       c10::string_view group_score_view,
                                                       std::optional<at::ScalarType> logits_dtype) {
  const std::string scoring(scoring_view.data(), scoring_view.size());
  const std::string group_score(group_score_view.data(), group_score_view.size());
  const c10::cuda::CUDAGuard guard(x.device());
  if (!fused_serves(x, weight, bias, k, scoring, correction_bias, n_group, topk_group, group_score, logits_dtype)) {
    return two_kernels(x, weight, bias, k, scoring_view, renormalize, correction_bias, n_group, topk_group,
                       group_score_view, logits_dtype);
  }
  const int64_t tokens = x.size(0), experts = weight.size(0);
  const at::ScalarType logits_type = logits_dtype.value_or(x.scalar_type());
  const at::Tensor workspace = at::empty({tokens, experts}, x.options().dtype(logits_type));
  at::Tensor weights = at::empty({tokens, k}, x.options().dtype(at::kFloat));
  at::Tensor ids = at::empty({tokens, k}, x.options().dtype(at::kLong));

  FusedParams p{};
  p.gemm = gemm::make_params(x, weight, bias, logits_type);
  p.gemm.out = workspace.data_ptr();
  p.gemm.release_at_start = true;

  // The routing kernel's RowSelection for a contiguous [T, E] logits tensor (csrc/topk_routing.cu).
  const at::Tensor correction = correction_bias.has_value() ? correction_bias->contiguous() : at::Tensor();
  RowSelection& s = p.selection;
  s.num_experts = static_cast<int>(experts);
  s.k = static_cast<int>(k);
  s.bias = correction_bias.has_value() ? correction.data_ptr() : nullptr;
  s.bias_format = correction_bias.has_value() ? bias_format_of(correction.scalar_type()) : BiasFormat::kFloat32;
  s.renormalize = renormalize;
  const int vpl = experts_per_lane(s.num_experts);
  const int element_size = static_cast<int>(workspace.element_size());
  const int width = std::min(16 / element_size, vpl & -vpl);  // as vector_width<F, VPL>()
  s.vector_loads = width > 1 && experts % width == 0 &&
                   reinterpret_cast<uintptr_t>(workspace.data_ptr()) % (width * element_size) == 0;
  s.uniform_weight = static_cast<float>(1.0 / static_cast<double>(k));
  const bool grouped = n_group > 1;
  s.n_group = static_cast<int>(n_group);
  s.group_size = static_cast<int>(experts / n_group);
  s.topk_group = static_cast<int>(topk_group);
  s.lanes_per_group = grouped ? lanes_per_group(s.num_experts, static_cast<int>(n_group)) : 0;
  s.group_max = group_score == "max";
  p.weights = weights.data_ptr<float>();
  p.ids = ids.data_ptr<int64_t>();

  const int tiles = static_cast<int>((tokens + kTileTokens - 1) / kTileTokens);
  uint32_t base = g_next_counter.fetch_add(static_cast<uint32_t>(tiles), std::memory_order_relaxed) % kCounters;
  if (base + tiles > kCounters) base = 0;
  p.counter_base = static_cast<int>(base);

  const bool sigmoid = scoring == "sigmoid";
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  const bool bf16 = x.scalar_type() == at::kBFloat16;
  if (logits_type == at::kFloat) {
    bf16 ? launch_for_vpl<__nv_bfloat16, LogitFormat::kFloat32>(p, sigmoid, grouped, stream)
         : launch_for_vpl<__half, LogitFormat::kFloat32>(p, sigmoid, grouped, stream);
  } else {
    bf16 ? launch_for_vpl<__nv_bfloat16, LogitFormat::kBFloat16>(p, sigmoid, grouped, stream)
         : launch_for_vpl<__half, LogitFormat::kFloat16>(p, sigmoid, grouped, stream);
  }
  return {weights, ids};
}

// ------------------------------------------------------------- run-time settings

void set_max_tokens(int64_t max_tokens) {
  TORCH_CHECK_VALUE(max_tokens >= -1,
                    "router_routing: max_tokens must be >= 0, or -1 for the automatic choice; got " +
                        std::to_string(max_tokens));
  g_max_tokens.store(max_tokens, std::memory_order_relaxed);
}

// "auto": the fused kernel up to fused_max_tokens; "fused": wherever both kernels serve the
// call (the router GEMM's kernel at this T), whatever T; "two_kernels" (default, see g_path):
// never.
void set_path(c10::string_view path_view) {
  const std::string path(path_view.data(), path_view.size());
  TORCH_CHECK_VALUE(path == "auto" || path == "fused" || path == "two_kernels",
                    "router_routing: path must be one of ('auto', 'fused', 'two_kernels'), got '" + path + "'");
  g_path.store(static_cast<int>(path == "auto" ? Path::kAuto : path == "fused" ? Path::kFused : Path::kTwoKernels));
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusion_passes, m) {
  m.def("_router_routing_set_max_tokens(int max_tokens) -> ()", &set_max_tokens);
  m.def("_router_routing_fused_max_tokens(int hidden, int experts) -> int", &fused_max_tokens);
  m.def("_router_routing_set_path(str path) -> ()", &set_path);
}

TORCH_LIBRARY_IMPL(fusion_passes, CUDA, m) {
  m.impl("router_routing", &router_routing_cuda);
}
