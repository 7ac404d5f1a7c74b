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
//   launch and prologue overlap this one (DESIGN.md's PDL contract: a dependent's
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
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <optional>
#include <string>

namespace cg = cooperative_groups;

namespace {

constexpr int kWarps = 8;            // warps per CTA, all splitting K
constexpr int kThreads = kWarps * 32;
constexpr int kStepK = 32;           // k values per warp step (4 lanes x 8 values)
constexpr int kMaxClusterK = 8;      // CTAs per cluster splitting K (portable limit)
constexpr int kMaxExperts = 512;
constexpr int kSmemPad = 4;          // floats of padding per shared-memory tile row
constexpr int kMaxTileRows = 65535;  // gridDim.z limit on T tiles

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

enum class OutKind : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct RouterGemmParams {
  const void* x;
  const void* weight;
  const void* bias;  // nullptr: no bias
  void* out;         // [tokens, experts], contiguous
  int64_t x_row_stride;
  int64_t weight_row_stride;
  int64_t bias_stride;
  int tokens;
  int experts;
  int hidden;
  // The k-steps (32 k values each) split into cluster_k * kWarps contiguous parts: part i
  // has steps_per_part steps, plus one for the first long_parts parts.
  int steps_per_part;
  int long_parts;
  int cluster_shift;  // cluster_k = 1 << cluster_shift
  OutKind out_kind;
  bool weight_loads_before_wait;  // the weight is not written by a kernel that may still run
  bool release_at_start;          // launch_dependents at the CTA's start, else after its last store
};

// ------------------------------------------------------------------ device helpers

__device__ __forceinline__ void wait_for_prior_grids() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ void release_dependent_grids() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// Split cluster barrier: arrive (relaxed, or release to publish this thread's stores),
// later wait (acquire).
__device__ __forceinline__ void cluster_arrive_relaxed() {
  asm volatile("barrier.cluster.arrive.relaxed.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_arrive_release() {
  asm volatile("barrier.cluster.arrive.release.aligned;" ::: "memory");
}

__device__ __forceinline__ void cluster_wait() { asm volatile("barrier.cluster.wait.acquire.aligned;" ::: "memory"); }

__device__ __forceinline__ void prefetch_l2(const void* ptr) { asm volatile("prefetch.global.L2 [%0];" ::"l"(ptr)); }

// 16-byte read-only load that does not allocate in L1 (each byte is read once per CTA).
__device__ __forceinline__ uint4 load_16B(const void* ptr) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(ptr)
               : "memory");
  return v;
}

template <typename Elem>
struct Mma;

template <>
struct Mma<__nv_bfloat16> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
};

template <>
struct Mma<__half> {
  static __device__ __forceinline__ void run(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                             uint32_t b0, uint32_t b1) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, "
        "{%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
  static __device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
};

__device__ __forceinline__ void add_to(float4& sum, const float4& v) {
  sum.x += v.x;
  sum.y += v.y;
  sum.z += v.z;
  sum.w += v.w;
}

// Stores up to four consecutive outputs of one token row, rounding each once.
__device__ __forceinline__ void store_outputs(const RouterGemmParams& p, int64_t offset, const float (&v)[4],
                                              int count) {
  const bool whole = count == 4 && (p.experts % 4) == 0;  // 4-element aligned run
  switch (p.out_kind) {
    case OutKind::kFloat32: {
      float* out = static_cast<float*>(p.out) + offset;
      if (whole) {
        *reinterpret_cast<float4*>(out) = make_float4(v[0], v[1], v[2], v[3]);
      } else {
        for (int j = 0; j < count; ++j) out[j] = v[j];
      }
      break;
    }
    case OutKind::kBFloat16: {
      __nv_bfloat16* out = static_cast<__nv_bfloat16*>(p.out) + offset;
      if (whole) {
        __nv_bfloat162 lo = __floats2bfloat162_rn(v[0], v[1]);
        __nv_bfloat162 hi = __floats2bfloat162_rn(v[2], v[3]);
        uint2 packed;
        packed.x = *reinterpret_cast<uint32_t*>(&lo);
        packed.y = *reinterpret_cast<uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(out) = packed;
      } else {
        for (int j = 0; j < count; ++j) out[j] = __float2bfloat16_rn(v[j]);
      }
      break;
    }
    case OutKind::kFloat16: {
      __half* out = static_cast<__half*>(p.out) + offset;
      if (whole) {
        __half2 lo = __floats2half2_rn(v[0], v[1]);
        __half2 hi = __floats2half2_rn(v[2], v[3]);
        uint2 packed;
        packed.x = *reinterpret_cast<uint32_t*>(&lo);
        packed.y = *reinterpret_cast<uint32_t*>(&hi);
        *reinterpret_cast<uint2*>(out) = packed;
      } else {
        for (int j = 0; j < count; ++j) out[j] = __float2half_rn(v[j]);
      }
      break;
    }
  }
}

// k-steps whose loads one warp issues before its first mma: as many as fit in about 72
// registers of operands (the kernel runs two CTAs an SM, so at most 128 registers a
// thread), at most 8.
__host__ __device__ constexpr int chunk_steps(int m_tiles, int n_tiles) {
  return 72 / (8 * m_tiles + 4 * n_tiles) < 8 ? 72 / (8 * m_tiles + 4 * n_tiles) : 8;
}

__host__ __device__ constexpr int log2_exact(int v) { return v <= 1 ? 0 : 1 + log2_exact(v / 2); }

template <int kMTiles, int kNTiles>
struct Tile {
  static constexpr int kExperts = 16 * kMTiles;
  static constexpr int kTokens = 8 * kNTiles;
  static constexpr int kLd = kExperts + kSmemPad;  // floats per token row in shared memory
  static constexpr int kSlot = kTokens * kLd;      // floats of one warp's partial tile
  static constexpr int kGroups = kTokens * kExperts / 4;  // 4-expert output groups (a power of 2)
  static constexpr int kGroupsShift = log2_exact(kGroups);
  static constexpr int kChunk = chunk_steps(kMTiles, kNTiles);
  // Shared memory: the warps' partial tiles, then the receive buffer where the cluster's
  // CTAs deposit their CTA partials of the groups this CTA finalizes ([rank][group]).
  static constexpr size_t kSlotsBytes = sizeof(float) * kWarps * kSlot;
  static constexpr size_t kSmemBytes = kSlotsBytes + sizeof(float4) * kGroups;
  static constexpr int kFinalPerThread = (kGroups + kThreads - 1) / kThreads;  // groups finalized by one thread
  static_assert((1 << kGroupsShift) == kGroups && kGroups >= 4 * kMaxClusterK, "groups split evenly over ranks");
};

// --------------------------------------------------------------------------- kernel

template <typename Elem, int kMTiles, int kNTiles>
__global__ void __launch_bounds__(kThreads, 2) router_gemm_kernel(const RouterGemmParams p) {
  using Shape = Tile<kMTiles, kNTiles>;
  extern __shared__ float4 smem_f4[];
  float* partials = reinterpret_cast<float*>(smem_f4);                // [kWarps][kTokens][kLd]
  float4* received = smem_f4 + Shape::kSlotsBytes / sizeof(float4);  // [cluster_k][groups_per_rank]

  const cg::cluster_group cluster = cg::this_cluster();
  const int rank = static_cast<int>(cluster.block_rank());
  const int cluster_k = 1 << p.cluster_shift;
  const int groups_per_rank_shift = Shape::kGroupsShift - p.cluster_shift;
  const int groups_per_rank = 1 << groups_per_rank_shift;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int group = lane / 4;  // mma row (expert) / column (token) within a tile
  const int quad = lane % 4;   // which 8 of the step's 32 k values this lane loads
  const int expert_base = blockIdx.y * Shape::kExperts;
  const int token_base = blockIdx.z * Shape::kTokens;

  if (p.release_at_start) release_dependent_grids();

  // First half of a cluster barrier: this CTA runs. Its wait, just before the CTAs store
  // into each other's shared memory, makes sure every CTA of the cluster has started.
  cluster_arrive_relaxed();

  // This warp's part of the k-steps: fixed by H and the cluster size only.
  const int part = rank * kWarps + warp;
  const int step_begin = part * p.steps_per_part + min(part, p.long_parts);
  const int step_end = step_begin + p.steps_per_part + (part < p.long_parts ? 1 : 0);

  const Elem* weight_rows[kMTiles][2];  // rows group and group+8 of each 16-expert tile
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int e = expert_base + mt * 16 + half * 8 + group;
      weight_rows[mt][half] = e < p.experts ? static_cast<const Elem*>(p.weight) + e * p.weight_row_stride : nullptr;
    }
  }
  const Elem* x_rows[kNTiles];
#pragma unroll
  for (int nt = 0; nt < kNTiles; ++nt) {
    const int t = token_base + nt * 8 + group;
    x_rows[nt] = t < p.tokens ? static_cast<const Elem*>(p.x) + t * p.x_row_stride : nullptr;
  }

  const uint4 zero = make_uint4(0, 0, 0, 0);
  uint4 w_frag[Shape::kChunk][kMTiles][2];
  auto load_weight_chunk = [&](int chunk_begin) {
#pragma unroll
    for (int c = 0; c < Shape::kChunk; ++c) {
      if (chunk_begin + c < step_end) {  // warp-uniform
        const int k = (chunk_begin + c) * kStepK + quad * 8;
        const bool k_valid = k < p.hidden;  // H % 8 == 0: a 16-byte piece is all in or all out
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
          for (int half = 0; half < 2; ++half) {
            w_frag[c][mt][half] =
                (k_valid && weight_rows[mt][half] != nullptr) ? load_16B(weight_rows[mt][half] + k) : zero;
          }
        }
      }
    }
  };

  // Before the previous grid is done: no running kernel writes the weight (the
  // precondition of weight_loads_before_wait, see the header), so the warp's first chunk of
  // it is loaded into registers now, overlapping the previous kernel's tail and this one's
  // launch; the rest of the warp's slice is only prefetched into L2 (a prefetch cannot
  // return stale data: L2 is the point of coherence). x and the bias are read after
  // griddepcontrol.wait.
  if (!p.weight_loads_before_wait) wait_for_prior_grids();
  load_weight_chunk(step_begin);
  for (int s = step_begin + Shape::kChunk; s < step_end; ++s) {
    const int k = s * kStepK + quad * 8;
    if (k < p.hidden) {
#pragma unroll
      for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
        for (int half = 0; half < 2; ++half) {
          if (weight_rows[mt][half] != nullptr) prefetch_l2(weight_rows[mt][half] + k);
        }
      }
    }
  }
  wait_for_prior_grids();

  float acc[kMTiles][kNTiles][4];
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[mt][nt][i] = 0.0f;
    }
  }

  for (int chunk_begin = step_begin; chunk_begin < step_end; chunk_begin += Shape::kChunk) {
    if (chunk_begin != step_begin) load_weight_chunk(chunk_begin);
    uint4 x_frag[Shape::kChunk][kNTiles];
#pragma unroll
    for (int c = 0; c < Shape::kChunk; ++c) {
      if (chunk_begin + c < step_end) {  // warp-uniform
        const int k = (chunk_begin + c) * kStepK + quad * 8;
        const bool k_valid = k < p.hidden;
#pragma unroll
        for (int nt = 0; nt < kNTiles; ++nt) {
          x_frag[c][nt] = (k_valid && x_rows[nt] != nullptr) ? load_16B(x_rows[nt] + k) : zero;
        }
      }
    }
#pragma unroll
    for (int c = 0; c < Shape::kChunk; ++c) {
      if (chunk_begin + c < step_end) {
#pragma unroll
        for (int mt = 0; mt < kMTiles; ++mt) {
          const uint4 w_lo = w_frag[c][mt][0];  // expert row group
          const uint4 w_hi = w_frag[c][mt][1];  // expert row group + 8
#pragma unroll
          for (int nt = 0; nt < kNTiles; ++nt) {
            const uint4 xv = x_frag[c][nt];
            // k values quad*8 + {0..3} of this step, then quad*8 + {4..7}.
            Mma<Elem>::run(acc[mt][nt], w_lo.x, w_hi.x, w_lo.y, w_hi.y, xv.x, xv.y);
            Mma<Elem>::run(acc[mt][nt], w_lo.z, w_hi.z, w_lo.w, w_hi.w, xv.z, xv.w);
          }
        }
      }
    }
  }

  // The bias of the output groups this thread finalizes, read now so that the load
  // overlaps the exchange (not earlier: registers are short in the main loop).
  float final_bias[Shape::kFinalPerThread][4] = {};
  if (p.bias != nullptr) {
    const Elem* bias = static_cast<const Elem*>(p.bias);
#pragma unroll
    for (int f = 0; f < Shape::kFinalPerThread; ++f) {
      const int i = threadIdx.x + f * kThreads;
      const int expert = expert_base + ((rank * groups_per_rank + i) % (Shape::kExperts / 4)) * 4;
      if (i < groups_per_rank) {
#pragma unroll
        for (int j = 0; j < 4; ++j) {
          if (expert + j < p.experts) final_bias[f][j] = Mma<Elem>::to_float(bias[(expert + j) * p.bias_stride]);
        }
      }
    }
  }

  // Each warp's partial tile to its own slot, [token][expert] (the padding keeps the
  // four quads of a warp on different banks).
  float* slot = partials + warp * Shape::kSlot;
#pragma unroll
  for (int mt = 0; mt < kMTiles; ++mt) {
#pragma unroll
    for (int nt = 0; nt < kNTiles; ++nt) {
      const int e = mt * 16 + group;
      const int t = nt * 8 + quad * 2;
      slot[t * Shape::kLd + e] = acc[mt][nt][0];
      slot[(t + 1) * Shape::kLd + e] = acc[mt][nt][1];
      slot[t * Shape::kLd + e + 8] = acc[mt][nt][2];
      slot[(t + 1) * Shape::kLd + e + 8] = acc[mt][nt][3];
    }
  }
  __syncthreads();

  // CTA partial of each 4-expert group = sum of the warps' partials in warp order, stored
  // (over distributed shared memory) into the receive buffer of the CTA that finalizes the
  // group (rank q / groups_per_rank) at [this rank][q % groups_per_rank].
  cluster_wait();
  for (int q = threadIdx.x; q < Shape::kGroups; q += kThreads) {
    const int offset = (q / (Shape::kExperts / 4)) * Shape::kLd + (q % (Shape::kExperts / 4)) * 4;
    float4 sum = *reinterpret_cast<const float4*>(partials + offset);
#pragma unroll
    for (int w = 1; w < kWarps; ++w) {
      add_to(sum, *reinterpret_cast<const float4*>(partials + w * Shape::kSlot + offset));
    }
    const int owner = q >> groups_per_rank_shift;
    cluster.map_shared_rank(received, owner)[rank * groups_per_rank + (q & (groups_per_rank - 1))] = sum;
  }
  cluster_arrive_release();
  cluster_wait();  // every CTA partial of this CTA's groups has arrived

  // Finalize this CTA's groups: sum of the CTA partials in rank order, + bias, one rounding.
#pragma unroll
  for (int f = 0; f < Shape::kFinalPerThread; ++f) {
    const int i = threadIdx.x + f * kThreads;
    if (i < groups_per_rank) {
      float4 cta_partial[kMaxClusterK];
#pragma unroll
      for (int r = 0; r < kMaxClusterK; ++r) {
        if (r < cluster_k) cta_partial[r] = received[r * groups_per_rank + i];
      }
      float4 sum = cta_partial[0];
#pragma unroll
      for (int r = 1; r < kMaxClusterK; ++r) {
        if (r < cluster_k) add_to(sum, cta_partial[r]);
      }
      float v[4] = {sum.x, sum.y, sum.z, sum.w};
      if (p.bias != nullptr) {
#pragma unroll
        for (int j = 0; j < 4; ++j) v[j] += final_bias[f][j];
      }
      const int q = rank * groups_per_rank + i;
      const int token = token_base + q / (Shape::kExperts / 4);
      const int expert = expert_base + (q % (Shape::kExperts / 4)) * 4;
      if (token < p.tokens && expert < p.experts) {
        store_outputs(p, static_cast<int64_t>(token) * p.experts + expert, v, min(4, p.experts - expert));
      }
    }
  }
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

bool aligned_rows(const at::Tensor& t) {
  const bool ptr_aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  const bool unit_inner = t.stride(1) == 1;
  const bool row_aligned = t.size(0) == 1 || t.stride(0) % 8 == 0;
  return ptr_aligned && unit_inner && row_aligned;
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

int multiprocessor_count(int device) {
  static std::atomic<int> counts[64];  // 0: not read yet
  if (device < 0 || device >= 64) return 132;
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
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
  auto* kernel = router_gemm_kernel<Elem, kMTiles, kNTiles>;
  if constexpr (Shape::kSmemBytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(Shape::kSmemBytes)));
  }
  const unsigned cluster_k = 1u << p.cluster_shift;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster_k, (p.experts + Shape::kExperts - 1) / Shape::kExperts,
                        (p.tokens + Shape::kTokens - 1) / Shape::kTokens);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = Shape::kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute attrs[2];
  attrs[0].id = cudaLaunchAttributeClusterDimension;
  attrs[0].val.clusterDim.x = cluster_k;
  attrs[0].val.clusterDim.y = 1;
  attrs[0].val.clusterDim.z = 1;
  attrs[1].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attrs[1].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attrs;
  config.numAttrs = 2;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p));
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

// Largest T that the kernel serves for an H x E weight under the current max_tokens
// setting (for 16-bit, aligned inputs with H % 8 == 0 and E <= 512; others go to cuBLAS).
int64_t kernel_max_tokens(int64_t hidden, int64_t experts) {
  const int64_t max_tokens = g_max_tokens.load(std::memory_order_relaxed);
  if (max_tokens >= 0) return max_tokens;
  const int64_t per_token = std::max<int64_t>(1, hidden * experts);
  return std::min(kAutoMaxTokens, kAutoMaxWork / per_token);
}

OutKind out_kind(at::ScalarType t) {
  return t == at::kFloat ? OutKind::kFloat32 : t == at::kBFloat16 ? OutKind::kBFloat16 : OutKind::kFloat16;
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

  const bool kernel_dtype = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool kernel_shape = hidden % 8 == 0 && experts <= kMaxExperts;
  const bool kernel_tokens = tokens <= kernel_max_tokens(hidden, experts);
  if (!(kernel_dtype && kernel_shape && kernel_tokens && aligned_rows(x) && aligned_rows(weight))) {
    return cublas_router_gemm(x, weight, bias, dtype);
  }
  // Cluster size: up to kMaxClusterK CTAs, about one k-step a warp or more, a power of 2.
  const int k_steps = static_cast<int>((hidden + kStepK - 1) / kStepK);
  int cluster_shift = 0;
  while (cluster_shift < log2_exact(kMaxClusterK) && (kWarps << (cluster_shift + 1)) <= k_steps) ++cluster_shift;
  const int parts = kWarps << cluster_shift;
  const TileShape tiles = choose_tiles(tokens, experts, 1 << cluster_shift, multiprocessor_count(x.get_device()));
  if ((tokens + 8 * tiles.n_tiles - 1) / (8 * tiles.n_tiles) > kMaxTileRows) {
    return cublas_router_gemm(x, weight, bias, dtype);
  }

  at::Tensor out = at::empty({tokens, experts}, x.options().dtype(dtype));
  RouterGemmParams p;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = out.data_ptr();
  p.x_row_stride = x.stride(0);
  p.weight_row_stride = weight.stride(0);
  p.bias_stride = bias.has_value() ? bias->stride(0) : 0;
  p.tokens = static_cast<int>(tokens);
  p.experts = static_cast<int>(experts);
  p.hidden = static_cast<int>(hidden);
  p.cluster_shift = cluster_shift;
  p.steps_per_part = k_steps / parts;
  p.long_parts = k_steps % parts;
  p.out_kind = out_kind(dtype);
  p.weight_loads_before_wait = g_weight_loads_before_wait.load(std::memory_order_relaxed);
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

// Whether the kernel may load the weight before griddepcontrol.wait (default true); false
// for callers whose weight is written by the kernel just before the op.
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
