// The router GEMM's device code (csrc/router_gemm.cu describes the design): the parameters,
// the tensor-core tile with its deterministic cluster reduction (gemm_tile), and the host rules
// that fix the K split. Included by csrc/router_gemm.cu (the router GEMM kernel: gemm_tile, then
// an optional release of the dependents) and by csrc/router_routing.cu (the fused router +
// routing kernel: gemm_tile into a workspace, then the routing of the finished rows), so that the
// two kernels compute every logit with the same instructions in the same order: the fused op's
// logits are the router GEMM's, bit for bit.
//
// gemm_tile releases the dependents at the CTA's start when p.release_at_start, executes
// griddepcontrol.wait before it reads x or the bias (and before the weight unless
// p.weight_loads_before_wait), and stores the CTA's finished 4-expert groups of the
// [tokens, experts] output, rounded once to p.out_kind, into p.out.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <atomic>
#include <cstdint>
#include <optional>

namespace fusion_passes::router_gemm_tile {

namespace cg = cooperative_groups;

constexpr int kWarps = 8;            // warps per CTA, all splitting K
constexpr int kThreads = kWarps * 32;
constexpr int kStepK = 32;           // k values per warp step (4 lanes x 8 values)
constexpr int kMaxClusterK = 8;      // CTAs per cluster splitting K (portable limit)
constexpr int kMaxExperts = 512;
constexpr int kSmemPad = 4;          // floats of padding per shared-memory tile row
constexpr int kMaxTileRows = 65535;  // gridDim.z limit on T tiles

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

// Stores up to four consecutive 16-bit outputs, each rounded once by `round` (fp32 -> Elem); a
// 4-element aligned run as one 8-byte store.
template <typename Elem, typename Round>
__device__ __forceinline__ void store_16_bit_outputs(Elem* out, const float (&v)[4], int count, bool whole,
                                                     Round round) {
  if (whole) {
    struct alignas(8) Run {
      Elem e[4];
    };
    *reinterpret_cast<Run*>(out) = Run{{round(v[0]), round(v[1]), round(v[2]), round(v[3])}};
  } else {
    for (int j = 0; j < count; ++j) out[j] = round(v[j]);
  }
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
    case OutKind::kBFloat16:
      store_16_bit_outputs(static_cast<__nv_bfloat16*>(p.out) + offset, v, count, whole,
                           [](float x) { return __float2bfloat16_rn(x); });
      break;
    case OutKind::kFloat16:
      store_16_bit_outputs(static_cast<__half*>(p.out) + offset, v, count, whole,
                           [](float x) { return __float2half_rn(x); });
      break;
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

// ------------------------------------------------------------------------------ the tile

// One CTA's tile of 16*kMTiles experts x 8*kNTiles tokens at (blockIdx.y, blockIdx.z), its part
// of K given by its cluster rank; the dynamic shared memory holds Tile<kMTiles, kNTiles>::kSmemBytes.
template <typename Elem, int kMTiles, int kNTiles>
__device__ __forceinline__ void gemm_tile(const RouterGemmParams& p) {
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
}

// -------------------------------------------------------------------------------- host

inline bool aligned_rows(const at::Tensor& t) {
  const bool ptr_aligned = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0;
  const bool unit_inner = t.stride(1) == 1;
  const bool row_aligned = t.size(0) == 1 || t.stride(0) % 8 == 0;
  return ptr_aligned && unit_inner && row_aligned;
}

inline OutKind out_kind(at::ScalarType t) {
  return t == at::kFloat ? OutKind::kFloat32 : t == at::kBFloat16 ? OutKind::kBFloat16 : OutKind::kFloat16;
}

// The number of SMs of a device, read once.
inline int multiprocessor_count(int device) {
  static std::atomic<int> counts[64];  // 0: not read yet
  if (device < 0 || device >= 64) return 132;
  int count = counts[device].load(std::memory_order_relaxed);
  if (count == 0) {
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&count, cudaDevAttrMultiProcessorCount, device));
    counts[device].store(count, std::memory_order_relaxed);
  }
  return count;
}

// Largest T that the router GEMM kernel serves for an H x E weight under the current
// _router_gemm_set_max_tokens setting (csrc/router_gemm.cu).
int64_t kernel_max_tokens(int64_t hidden, int64_t experts);

// The _router_gemm_set_weight_loads_before_wait setting (csrc/router_gemm.cu).
bool weight_loads_before_wait();

// Whether the router GEMM kernel (not cuBLAS) computes router_gemm(x, weight, ...) on valid
// arguments: 16-bit inputs, H a positive multiple of 8, 1 <= E <= 512, 16-byte aligned rows with
// unit inner stride, 1 <= T <= kernel_max_tokens(H, E).
inline bool kernel_serves(const at::Tensor& x, const at::Tensor& weight) {
  const int64_t tokens = x.size(0), hidden = x.size(1), experts = weight.size(0);
  const bool kernel_dtype = x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf;
  const bool kernel_shape = hidden > 0 && hidden % 8 == 0 && experts >= 1 && experts <= kMaxExperts;
  return kernel_dtype && kernel_shape && tokens >= 1 && tokens <= kernel_max_tokens(hidden, experts) &&
         aligned_rows(x) && aligned_rows(weight);
}

// log2 of the cluster size for hidden size H: up to kMaxClusterK CTAs, about one k-step a warp
// or more, a power of 2.
inline int cluster_shift_for(int64_t hidden) {
  const int64_t k_steps = (hidden + kStepK - 1) / kStepK;
  int cluster_shift = 0;
  while (cluster_shift < log2_exact(kMaxClusterK) && (kWarps << (cluster_shift + 1)) <= k_steps) ++cluster_shift;
  return cluster_shift;
}

// The kernel's parameters for inputs it serves (kernel_serves), out and the release point
// aside. The K split (cluster size and parts) depends on H only: it fixes the order of the
// sums, hence the bits of every logit.
inline RouterGemmParams make_params(const at::Tensor& x, const at::Tensor& weight,
                                    const std::optional<at::Tensor>& bias, at::ScalarType out_dtype) {
  const int hidden = static_cast<int>(x.size(1));
  const int k_steps = (hidden + kStepK - 1) / kStepK;
  const int cluster_shift = cluster_shift_for(hidden);
  const int parts = kWarps << cluster_shift;
  RouterGemmParams p;
  p.x = x.data_ptr();
  p.weight = weight.data_ptr();
  p.bias = bias.has_value() ? bias->data_ptr() : nullptr;
  p.out = nullptr;
  p.x_row_stride = x.stride(0);
  p.weight_row_stride = weight.stride(0);
  p.bias_stride = bias.has_value() ? bias->stride(0) : 0;
  p.tokens = static_cast<int>(x.size(0));
  p.experts = static_cast<int>(weight.size(0));
  p.hidden = hidden;
  p.cluster_shift = cluster_shift;
  p.steps_per_part = k_steps / parts;
  p.long_parts = k_steps % parts;
  p.out_kind = out_kind(out_dtype);
  p.weight_loads_before_wait = weight_loads_before_wait();
  p.release_at_start = true;
  return p;
}

// Launches `kernel(params)` on the grid of the GEMM `p` with tiles of kTileExperts x
// kTileTokens, (cluster_k, E tiles, T tiles) CTAs in clusters of (cluster_k, 1, 1), with
// programmatic stream serialization.
template <int kTileExperts, int kTileTokens, typename Params>
void launch_clustered(void (*kernel)(Params), const Params& params, const RouterGemmParams& p, size_t smem_bytes,
                      cudaStream_t stream) {
  if (smem_bytes > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                        static_cast<int>(smem_bytes)));
  }
  const unsigned cluster_k = 1u << p.cluster_shift;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster_k, (p.experts + kTileExperts - 1) / kTileExperts,
                        (p.tokens + kTileTokens - 1) / kTileTokens);
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = smem_bytes;
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
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, params));
}

}  // namespace fusion_passes::router_gemm_tile
