// CUDA implementation of fusion_passes::router_gemm for Hopper (sm_90a).
//
//   out[t, e] = round_once(sum_h x[t, h] * weight[e, h] + bias[e])   (fp32 accumulation)
//
// The router GEMM of a MoE layer is a skinny GEMM: T (tokens) is small at decode, E
// (experts) is at most a few hundred, H (hidden) is thousands. Reading the weight
// (E * H * 2 bytes) dominates, so the kernel spreads that read over many SMs and issues
// all of a warp's 16-byte loads before it waits on any; the arithmetic runs on the tensor
// cores (mma.sync m16n8k16, experts as M, tokens as N, fp32 accumulators).
//
// The device code (parameters, tile, cluster reduction) is csrc/router_gemm_tile.cuh, shared
// with the fused router + routing kernel (csrc/router_routing.cu), whose logits are therefore
// this kernel's bit for bit; this file holds the kernel around it, the dispatch and the settings.
//
// Work decomposition
//   grid = (cluster_k, E tiles, T tiles), cluster = (cluster_k, 1, 1), 8 warps a CTA, up
//   to two CTAs an SM. The K (hidden) dimension is cut into 32-wide "k-steps"; the
//   cluster_k CTAs of a cluster (1, 2, 4 or 8, by H) and the 8 warps of each CTA split the
//   k-steps into cluster_k * 8 contiguous "parts", and each warp accumulates its part for
//   the CTA's whole tile of 16*M_TILES experts x 8*N_TILES tokens in registers. The tile
//   shape (1x1, 1x2, 2x4, 2x8) is the smallest that holds up to 16 tokens and whose grid
//   fits in one CTA an SM.
//
// Fragments without shared memory
//   A dot product may visit k in any order, as long as both operands use the same one.
//   Lane (group = lane/4, quad = lane%4) loads 16 contiguous bytes (8 values) of weight
//   rows `group` and `group+8` and of token row `group`, at k = step*32 + quad*8; those
//   8 values feed the k-slots {2q, 2q+1, 2q+8, 2q+9} of two mma instructions. So every
//   global load is a 16-byte vector load straight into the mma operand registers: no
//   shared-memory staging, no cp.async/TMA pipeline, hence no pipeline stage to get wrong.
//
// Deterministic reduction (batch invariance)
//   out[t, e] = bias[e] + sum over CTA ranks r of (sum over warps w of part(r, w)), each
//   sum taken left to right; part(r, w) sums its k-steps in order, each step as two mma.
//   The parts depend only on H, never on T or on the tile shape, and an mma computes each
//   output element from its own row and column only. So row t of the output is bitwise
//   the same for every T and every tile shape: batch invariance by construction.
//   The warps of a CTA reduce through shared memory in warp order. Each CTA then stores its
//   CTA partial of every 4-expert group into the shared memory of the CTA of the cluster
//   that finalizes that group (distributed shared memory); after a cluster barrier each CTA
//   adds its cluster_k partials in rank order and the bias in fp32, and rounds once to the
//   output dtype. No atomics, no global workspace, no counters, nothing to reset between
//   calls or CUDA-graph replays. A split cluster barrier (arrive at the start, wait before
//   the first remote store) makes sure every CTA of the cluster runs before anything lands
//   in its shared memory; no CTA reads remote shared memory, so none has to outlive another.
//   (An mbarrier per finalizing CTA instead of the second cluster barrier was tried and
//   was no faster; see docs/notes/router_gemm.md.)
//
// Programmatic dependent launch (PDL)
//   The kernel is launched with programmatic stream serialization. By default every
//   operand is read after griddepcontrol.wait. Opt-in
//   (fusion_passes::_router_gemm_set_weight_loads_before_wait(True)): before the wait each
//   warp loads the first chunk of its weight slice into registers and prefetches the rest
//   into L2, so the weight read overlaps the launch and the previous kernel's tail. That is
//   only correct when no kernel that may still run when this one starts (the one before it
//   on the stream, or under a chain of PDL launches the ones before that) writes the weight:
//   true of a parameter, false of a weight cast in the graph just before the router, which
//   the pass cannot rule out. Hence off by default. x and the bias are always read only
//   after griddepcontrol.wait, and every CTA waits before it exits. Every CTA releases its
//   dependents (griddepcontrol.launch_dependents) at its start, so that the next kernel's
//   launch and prologue overlap this one (the PDL contract of docs/ops.md: a dependent's
//   griddepcontrol.wait still returns only once this grid has completed and its stores are
//   visible). fusion_passes::_router_gemm_set_release_at_start(False) moves the release
//   after the CTA's last output store, as before, for benchmarks.
//
// Dispatch (router_gemm_cuda)
//   The kernel runs for bf16/fp16 inputs, any of bf16/fp16/fp32 output, E <= 512, H a
//   multiple of 8, 16-byte aligned rows with unit inner stride, and T up to a shape-aware
//   bound (T <= 512 and T * H * E <= 6e7, from measurements, see docs/benchmarks.md;
//   fusion_passes::_router_gemm_set_max_tokens replaces it with a plain bound on T, and
//   _router_gemm_kernel_max_tokens(H, E) reads it). Every other valid input goes to cuBLAS
//   (at::addmm / at::mm), which accumulates in fp32 and rounds once as far as cuBLAS does.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "router_gemm_tile.cuh"

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

namespace {

using namespace fusion_passes::router_gemm_tile;

// The automatic choice of kernel vs cuBLAS: the kernel while T <= kAutoMaxTokens and
// T * H * E <= kAutoMaxWork. The kernel's time grows with the work of a CTA while cuBLAS's
// stays nearly flat at small T, so on H100 the crossover follows T * H * E across the model
// shapes (see docs/benchmarks.md, "Threshold").
constexpr int64_t kAutoMaxTokens = 512;
constexpr int64_t kAutoMaxWork = 60'000'000;

std::atomic<int64_t> g_max_tokens{-1};  // -1: the automatic choice; else the largest T served
std::atomic<bool> g_weight_loads_before_wait{false};
std::atomic<int> g_forced_m_tiles{0};  // 0: choose the tile shape from T
std::atomic<int> g_forced_n_tiles{0};
std::atomic<bool> g_release_at_start{true};
std::atomic<int> g_ctas_per_sm{1};  // the automatic tile choice keeps the grid within this many CTAs an SM

// --------------------------------------------------------------------------- kernel

template <typename Elem, int kMTiles, int kNTiles>
__global__ void __launch_bounds__(kThreads, 2) router_gemm_kernel(const RouterGemmParams p) {
  gemm_tile<Elem, kMTiles, kNTiles>(p);
  if (!p.release_at_start) {
    __syncthreads();  // the CTA's last output store precedes its release of the dependents
    release_dependent_grids();
  }
}

// ----------------------------------------------------------------------------- host

// Messages format integers with std::to_string, never through std::ostream (c10::str):
// on the test machine, inserting an integer into an ostream from this extension crashed
// inside libstdc++ (a locale facet mismatch), so a bad-input error became a segfault.
std::string shape_str(at::IntArrayRef sizes) {
  std::string s = "(";
  for (size_t i = 0; i < sizes.size(); ++i) s += (i ? ", " : "") + std::to_string(sizes[i]);
  return s + (sizes.size() == 1 ? ",)" : ")");
}

std::string dtype_str(at::ScalarType t) {
  switch (t) {
    case at::kBFloat16: return "torch.bfloat16";
    case at::kHalf: return "torch.float16";
    case at::kFloat: return "torch.float32";
    case at::kDouble: return "torch.float64";
    case at::kLong: return "torch.int64";
    case at::kInt: return "torch.int32";
    case at::kShort: return "torch.int16";
    case at::kChar: return "torch.int8";
    case at::kByte: return "torch.uint8";
    case at::kBool: return "torch.bool";
    default: return std::string("torch.") + c10::toString(t);
  }
}

bool is_router_gemm_dtype(at::ScalarType t) { return t == at::kBFloat16 || t == at::kHalf || t == at::kFloat; }

constexpr const char* kDtypeList = "(torch.bfloat16, torch.float16, torch.float32)";

// The checks of ops.check_router_gemm_args, with the same messages (ValueError).
void check_args(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK_VALUE(x.dim() == 2, "router_gemm: x must be 2-D [T, H], got shape ", shape_str(x.sizes()));
  TORCH_CHECK_VALUE(weight.dim() == 2, "router_gemm: weight must be 2-D [E, H], got shape ",
                    shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(x.size(1) == weight.size(1), "router_gemm: hidden sizes differ: x is ", shape_str(x.sizes()),
                    ", weight is ", shape_str(weight.sizes()));
  TORCH_CHECK_VALUE(is_router_gemm_dtype(x.scalar_type()), "router_gemm: x dtype ", dtype_str(x.scalar_type()),
                    " is not one of ", kDtypeList);
  TORCH_CHECK_VALUE(weight.scalar_type() == x.scalar_type(), "router_gemm: weight dtype ",
                    dtype_str(weight.scalar_type()), " differs from x dtype ", dtype_str(x.scalar_type()));
  if (bias.has_value()) {
    TORCH_CHECK_VALUE(bias->dim() == 1 && bias->size(0) == weight.size(0), "router_gemm: bias must be [E]=",
                      std::to_string(weight.size(0)), ", got shape ", shape_str(bias->sizes()));
    TORCH_CHECK_VALUE(bias->scalar_type() == x.scalar_type(), "router_gemm: bias dtype ",
                      dtype_str(bias->scalar_type()), " differs from x dtype ", dtype_str(x.scalar_type()));
    TORCH_CHECK_VALUE(bias->device() == x.device(), "router_gemm: bias is on another device than x");
  }
  TORCH_CHECK_VALUE(weight.device() == x.device(), "router_gemm: weight is on another device than x");
  TORCH_CHECK_VALUE(!out_dtype.has_value() || is_router_gemm_dtype(*out_dtype), "router_gemm: out_dtype ",
                    out_dtype.has_value() ? dtype_str(*out_dtype) : std::string("None"), " is not one of ",
                    kDtypeList);
}

struct TileShape {
  int m_tiles;
  int n_tiles;
};

constexpr TileShape kTileShapes[] = {{1, 1}, {1, 2}, {2, 4}, {2, 8}};

bool is_tile_shape(int m_tiles, int n_tiles) {
  return std::any_of(std::begin(kTileShapes), std::end(kTileShapes),
                     [&](const TileShape& s) { return s.m_tiles == m_tiles && s.n_tiles == n_tiles; });
}

// Tile shape (forced shapes aside): the smallest tile that holds up to 16 tokens and
// whose grid still fits in one CTA an SM (ctas_per_sm CTAs an SM under
// _router_gemm_set_ctas_per_sm, a benchmark variant; two fit an SM at once). Small tiles spread the weight read over more
// CTAs; but two T tiles read the same weight concurrently (1x2 beat 1x1 by 7-12% at T = 16,
// E = 128), and once there are more CTAs than SMs, larger tiles win because x and the
// weight are re-read from L2 fewer times.
TileShape choose_tiles(int64_t tokens, int64_t experts, int cluster_k, int sms) {
  const int forced_m = g_forced_m_tiles.load(std::memory_order_relaxed);
  const int forced_n = g_forced_n_tiles.load(std::memory_order_relaxed);
  if (forced_m > 0) return {forced_m, forced_n};
  for (const TileShape& s : kTileShapes) {
    if (8 * s.n_tiles < std::min<int64_t>(tokens, 16)) continue;
    const int64_t ctas = cluster_k * ((experts + 16 * s.m_tiles - 1) / (16 * s.m_tiles)) *
                         ((tokens + 8 * s.n_tiles - 1) / (8 * s.n_tiles));
    if (ctas <= static_cast<int64_t>(sms) * g_ctas_per_sm.load(std::memory_order_relaxed)) return s;
  }
  return kTileShapes[std::size(kTileShapes) - 1];
}

template <typename Elem, int kMTiles, int kNTiles>
void launch_tile(const RouterGemmParams& p, cudaStream_t stream) {
  using Shape = Tile<kMTiles, kNTiles>;
  launch_clustered<Shape::kExperts, Shape::kTokens>(router_gemm_kernel<Elem, kMTiles, kNTiles>, p, p,
                                                     Shape::kSmemBytes, stream);
}

template <typename Elem>
void launch(const RouterGemmParams& p, TileShape tiles, cudaStream_t stream) {
  if (tiles.m_tiles == 1 && tiles.n_tiles == 1) return launch_tile<Elem, 1, 1>(p, stream);
  if (tiles.m_tiles == 1 && tiles.n_tiles == 2) return launch_tile<Elem, 1, 2>(p, stream);
  if (tiles.m_tiles == 2 && tiles.n_tiles == 4) return launch_tile<Elem, 2, 4>(p, stream);
  if (tiles.m_tiles == 2 && tiles.n_tiles == 8) return launch_tile<Elem, 2, 8>(p, stream);
  TORCH_CHECK(false, "router_gemm: no kernel for tile shape ", std::to_string(tiles.m_tiles), "x",
              std::to_string(tiles.n_tiles));
}

// cuBLAS for what the kernel does not handle. fp32 inputs: at::addmm in fp32, then the
// cast. 16-bit inputs on the layouts the kernel takes (T above max_tokens), with the
// output in the input dtype: at::addmm / at::mm, exactly what F.linear runs (fp32
// accumulation, bias in cuBLAS's fp32 epilogue, one rounding as far as cuBLAS goes: its
// reduced-precision-reduction settings apply). Everything else (other output dtypes,
// unaligned or strided operands, odd H, E > 512, matrix-vector shapes, on which torch's
// addmm was seen to round twice with a bias): an fp32 product, the bias in fp32, one cast.
at::Tensor cublas_router_gemm(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                              at::ScalarType out_dtype) {
  const at::Tensor weight_t = weight.t();
  if (x.scalar_type() == at::kFloat) {
    at::Tensor out = bias.has_value() ? at::addmm(*bias, x, weight_t) : at::mm(x, weight_t);
    return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
  }
  const bool linear_layout = x.size(0) > 1 && weight.size(0) > 1 && weight.size(0) <= kMaxExperts &&
                             x.size(1) % 8 == 0 && x.is_contiguous() && weight.is_contiguous() &&
                             aligned_rows(x) && aligned_rows(weight) && (!bias.has_value() || bias->is_contiguous());
  if (out_dtype == x.scalar_type() && linear_layout) {
    return bias.has_value() ? at::addmm(*bias, x, weight_t) : at::mm(x, weight_t);
  }
  at::Tensor acc = at::mm(x, weight_t, at::kFloat);  // 16-bit inputs, fp32 result
  if (bias.has_value()) acc.add_(*bias);
  return acc.scalar_type() == out_dtype ? acc : acc.to(out_dtype);
}

at::Tensor router_gemm_cuda(const at::Tensor& x, const at::Tensor& weight, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype) {
  check_args(x, weight, bias, out_dtype);
  const at::ScalarType dtype = out_dtype.value_or(x.scalar_type());
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = weight.size(0);
  const c10::cuda::CUDAGuard guard(x.device());
  if (tokens == 0 || experts == 0) return at::empty({tokens, experts}, x.options().dtype(dtype));
  if (hidden == 0) {  // an empty sum: the bias, or zeros
    at::Tensor acc = at::zeros({tokens, experts}, x.options().dtype(at::kFloat));
    if (bias.has_value()) acc.add_(*bias);
    return acc.to(dtype);
  }

  if (!kernel_serves(x, weight)) return cublas_router_gemm(x, weight, bias, dtype);
  RouterGemmParams p = make_params(x, weight, bias, dtype);
  const TileShape tiles = choose_tiles(tokens, experts, 1 << p.cluster_shift, multiprocessor_count(x.get_device()));
  if ((tokens + 8 * tiles.n_tiles - 1) / (8 * tiles.n_tiles) > kMaxTileRows) {
    return cublas_router_gemm(x, weight, bias, dtype);
  }
  at::Tensor out = at::empty({tokens, experts}, x.options().dtype(dtype));
  p.out = out.data_ptr();
  p.release_at_start = g_release_at_start.load(std::memory_order_relaxed);

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (x.scalar_type() == at::kBFloat16) {
    launch<__nv_bfloat16>(p, tiles, stream);
  } else {
    launch<__half>(p, tiles, stream);
  }
  return out;
}

// ------------------------------------------------------------- run-time settings

void set_max_tokens(int64_t max_tokens) {
  TORCH_CHECK_VALUE(max_tokens >= -1, "router_gemm: max_tokens must be >= 0, or -1 for the automatic choice; got ",
                    std::to_string(max_tokens));
  g_max_tokens.store(max_tokens, std::memory_order_relaxed);
}

int64_t get_max_tokens() { return g_max_tokens.load(std::memory_order_relaxed); }

// Whether the kernel may load the weight before griddepcontrol.wait (default false: only
// correct when no kernel that may still run writes the weight; see the header comment).
void set_weight_loads_before_wait(bool enabled) { g_weight_loads_before_wait.store(enabled); }

// Forces one kernel tile shape (16*m_tiles experts x 8*n_tiles tokens a CTA) for every
// T, for benchmarks and tests; (-1, -1) restores the choice by T. The result is bitwise
// the same for every tile shape.
void set_tiles(int64_t m_tiles, int64_t n_tiles) {
  if (m_tiles == -1 && n_tiles == -1) {
    g_forced_m_tiles.store(0);
    g_forced_n_tiles.store(0);
    return;
  }
  TORCH_CHECK_VALUE(is_tile_shape(static_cast<int>(m_tiles), static_cast<int>(n_tiles)),
                    "router_gemm: no kernel tile shape ", std::to_string(m_tiles), "x", std::to_string(n_tiles),
                    "; the shapes are 1x1, 1x2, 2x4, 2x8, or -1 -1 for automatic");
  g_forced_n_tiles.store(static_cast<int>(n_tiles));
  g_forced_m_tiles.store(static_cast<int>(m_tiles));
}

// Benchmark variants. Where a CTA releases its dependents: at its start (default) or after
// its last output store. Either is correct (the dependents' griddepcontrol.wait orders them).
void set_release_at_start(bool enabled) { g_release_at_start.store(enabled); }

// How many CTAs an SM the automatic tile choice may fill (1, default, 2 or 4): with more,
// larger T keep the smaller tiles (more CTAs share the weight read; two are resident an
// SM, so 4 means two waves). Tiles never change the result's bits.
void set_ctas_per_sm(int64_t ctas) {
  TORCH_CHECK_VALUE(ctas == 1 || ctas == 2 || ctas == 4, "router_gemm: ctas_per_sm must be 1, 2 or 4, got ",
                    std::to_string(ctas));
  g_ctas_per_sm.store(static_cast<int>(ctas));
}




// --------------------------------------------------- test-only PDL neighbour kernels
// A producer and a consumer that use programmatic dependent launch, to test the router
// GEMM between PDL neighbours. The producer releases its dependents at once and writes
// x only after a delay, so a dependent that read x before griddepcontrol.wait would read
// the previous contents; the consumer waits, then compares the logits bitwise with the
// expected ones for the variant the producer wrote.

void launch_with_pdl(const void* kernel_fn, dim3 grid, dim3 block, void** args, cudaStream_t stream) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = block;
  config.stream = stream;
  cudaLaunchAttribute attr;
  attr.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attr;
  config.numAttrs = 1;
  C10_CUDA_CHECK(cudaLaunchKernelExC(&config, kernel_fn, args));
}

__global__ void test_pdl_producer_kernel(const uint16_t* variants, const int32_t* step, uint16_t* x, int64_t numel,
                                         int num_variants, int64_t delay_ns) {
  release_dependent_grids();  // early on purpose: dependents must still wait for our stores
  wait_for_prior_grids();
  for (int64_t slept = 0; slept < delay_ns; slept += 1000) __nanosleep(1000);
  const uint16_t* src = variants + (*step % num_variants) * numel;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < numel; i += int64_t(gridDim.x) * blockDim.x) {
    x[i] = src[i];
  }
}

__device__ __forceinline__ bool is_nan_bits(uint32_t bits, int elem_bytes, bool is_bf16) {
  if (elem_bytes == 4) return (bits & 0x7fffffffu) > 0x7f800000u;
  return is_bf16 ? (bits & 0x7fffu) > 0x7f80u : (bits & 0x7fffu) > 0x7c00u;
}

__global__ void test_pdl_consumer_kernel(const void* logits, const void* expected, int64_t numel, int elem_bytes,
                                         bool is_bf16, int num_variants, int32_t* step,
                                         unsigned long long* counters) {
  wait_for_prior_grids();
  __shared__ int variant;
  __shared__ unsigned long long mismatches, nans;
  if (threadIdx.x == 0) {
    variant = *step % num_variants;
    mismatches = 0;
    nans = 0;
  }
  __syncthreads();
  unsigned long long my_mismatches = 0, my_nans = 0;
  for (int64_t i = threadIdx.x; i < numel; i += blockDim.x) {
    uint32_t got, want;
    if (elem_bytes == 4) {
      got = static_cast<const uint32_t*>(logits)[i];
      want = static_cast<const uint32_t*>(expected)[variant * numel + i];
    } else {
      got = static_cast<const uint16_t*>(logits)[i];
      want = static_cast<const uint16_t*>(expected)[variant * numel + i];
    }
    my_mismatches += got != want;
    my_nans += is_nan_bits(got, elem_bytes, is_bf16);
  }
  atomicAdd(&mismatches, my_mismatches);
  atomicAdd(&nans, my_nans);
  __syncthreads();
  if (threadIdx.x == 0) {
    counters[0] += mismatches;
    counters[1] += nans;
    *step += 1;
  }
  __syncthreads();
  release_dependent_grids();
}

void test_pdl_producer(const at::Tensor& variants, const at::Tensor& step, const at::Tensor& x, int64_t delay_ns) {
  TORCH_CHECK_VALUE(variants.dim() == 3 && variants.element_size() == 2 && variants.is_contiguous() &&
                        x.is_contiguous() && x.scalar_type() == variants.scalar_type() &&
                        x.numel() == variants.size(1) * variants.size(2),
                    "_test_pdl_producer: variants [P, T, H] and x [T, H], contiguous, one 16-bit dtype");
  TORCH_CHECK_VALUE(step.scalar_type() == at::kInt && step.numel() == 1, "_test_pdl_producer: step is int32 [1]");
  const c10::cuda::CUDAGuard guard(x.device());
  const uint16_t* variants_ptr = static_cast<const uint16_t*>(variants.data_ptr());
  const int32_t* step_ptr = step.data_ptr<int32_t>();
  uint16_t* x_ptr = static_cast<uint16_t*>(x.data_ptr());
  int64_t numel = x.numel();
  int num_variants = static_cast<int>(variants.size(0));
  void* args[] = {&variants_ptr, &step_ptr, &x_ptr, &numel, &num_variants, &delay_ns};
  launch_with_pdl(reinterpret_cast<const void*>(&test_pdl_producer_kernel), dim3(132), dim3(256), args,
                  c10::cuda::getCurrentCUDAStream());
}

void test_pdl_consumer(const at::Tensor& logits, const at::Tensor& expected, const at::Tensor& step,
                       const at::Tensor& counters) {
  TORCH_CHECK_VALUE(expected.dim() == 3 && logits.is_contiguous() && expected.is_contiguous() &&
                        logits.scalar_type() == expected.scalar_type() &&
                        logits.numel() == expected.size(1) * expected.size(2),
                    "_test_pdl_consumer: logits [T, E] and expected [P, T, E], contiguous, one dtype");
  TORCH_CHECK_VALUE(step.scalar_type() == at::kInt && step.numel() == 1, "_test_pdl_consumer: step is int32 [1]");
  TORCH_CHECK_VALUE(counters.scalar_type() == at::kLong && counters.numel() == 2,
                    "_test_pdl_consumer: counters is int64 [2]");
  const c10::cuda::CUDAGuard guard(logits.device());
  const void* logits_ptr = logits.data_ptr();
  const void* expected_ptr = expected.data_ptr();
  int64_t numel = logits.numel();
  int elem_bytes = static_cast<int>(logits.element_size());
  bool is_bf16 = logits.scalar_type() == at::kBFloat16;
  int num_variants = static_cast<int>(expected.size(0));
  int32_t* step_ptr = step.data_ptr<int32_t>();
  auto* counters_ptr = reinterpret_cast<unsigned long long*>(counters.data_ptr<int64_t>());
  void* args[] = {&logits_ptr, &expected_ptr, &numel, &elem_bytes, &is_bf16, &num_variants, &step_ptr, &counters_ptr};
  launch_with_pdl(reinterpret_cast<const void*>(&test_pdl_consumer_kernel), dim3(1), dim3(256), args,
                  c10::cuda::getCurrentCUDAStream());
}

}  // namespace

namespace fusion_passes::router_gemm_tile {

int64_t kernel_max_tokens(int64_t hidden, int64_t experts) {
  const int64_t max_tokens = g_max_tokens.load(std::memory_order_relaxed);
  if (max_tokens >= 0) return max_tokens;
  const int64_t per_token = std::max<int64_t>(1, hidden * experts);
  return std::min(kAutoMaxTokens, kAutoMaxWork / per_token);
}

bool weight_loads_before_wait() { return g_weight_loads_before_wait.load(std::memory_order_relaxed); }

}  // namespace fusion_passes::router_gemm_tile

TORCH_LIBRARY_FRAGMENT(fusion_passes, m) {
  m.def("_router_gemm_set_max_tokens(int max_tokens) -> ()", &set_max_tokens);
  m.def("_router_gemm_max_tokens() -> int", &get_max_tokens);
  m.def("_router_gemm_kernel_max_tokens(int hidden, int experts) -> int", &kernel_max_tokens);
  m.def("_router_gemm_set_tiles(int m_tiles, int n_tiles) -> ()", &set_tiles);
  m.def("_router_gemm_set_weight_loads_before_wait(bool enabled) -> ()", &set_weight_loads_before_wait);
  m.def("_router_gemm_set_release_at_start(bool enabled) -> ()", &set_release_at_start);
  m.def("_router_gemm_set_ctas_per_sm(int ctas) -> ()", &set_ctas_per_sm);
}

// Test-only ops (tests/test_router_gemm_cuda.py): PDL neighbours for the router GEMM.
TORCH_LIBRARY_FRAGMENT(fusion_passes, m) {
  m.def("_test_pdl_producer(Tensor variants, Tensor step, Tensor(a!) x, int delay_ns) -> ()");
  m.def("_test_pdl_consumer(Tensor logits, Tensor expected, Tensor(a!) step, Tensor(b!) counters) -> ()");
}

TORCH_LIBRARY_IMPL(fusion_passes, CUDA, m) {
  m.impl("router_gemm", &router_gemm_cuda);
  m.impl("_test_pdl_producer", &test_pdl_producer);
  m.impl("_test_pdl_consumer", &test_pdl_consumer);
}
