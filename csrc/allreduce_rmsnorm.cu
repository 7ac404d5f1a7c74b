// fusion_passes::fused_allreduce_rmsnorm on CUDA: the kernels behind the Python runtime in
// fusion_passes/fused_allreduce.py, which owns the symmetric-memory workspace and picks the path.
//
// Semantics (fusion_passes/ops.py, `fused_allreduce_rmsnorm_reference`):
//   r = sum of x over the ranks, rounded once to x's dtype;
//   h = r + residual (or r), rounded to x's dtype            -> residual_out
//   out = h * rsqrt(mean(h^2) + eps) * weight in fp32, rounded once -> out
//
// Three modes, one row routine (`normalize_rows`), which differ only in where r comes from:
//  * kOneShot: every rank copies its rows of x into its own symmetric buffer, meets its peers at a
//    barrier, then reads the same rows from every peer and sums them in rank order 0..W-1 in
//    fp32. Every rank does the same arithmetic on the same bits, so outputs are bitwise equal.
//  * kTwoShot: as one-shot up to the barrier; then row i is reduced by rank i % W only, which
//    writes r into its buffer's reduced region; a second barrier; then every rank reads each
//    row's r from its owner and normalizes with its own residual. Each r is computed once, so
//    all ranks agree bitwise; remote reads are (W-1)/W of one-shot's for the reduction, plus a
//    gather of r.
//  * kLocal: x already holds r (the NCCL path: NCCL all-reduce, then this kernel for add+norm).
//    Bandwidth-bound at large T, so it has its own kernel, add_rmsnorm_rows_kernel (row groups
//    of a few warps, no block-wide barrier, launched with PDL); the one-block-a-row form of the
//    shared kernel stays selectable (set_local_layout) until the benchmark has chosen.
//
// Synchronization, without multicast (not available on these machines):
//  * Rows map to blocks the same way on every rank (same T, same grid), so block b only ever
//    reads rows that block b of each peer wrote: the barriers are per block. Block b of rank s
//    signals block b of rank d with one system-scope release store into d's signal pad, slot
//    [barrier][b][s]: 64 bits, the call's sequence number (the epoch below, the same on every
//    rank) and a descriptor hashing (T, H, dtype, residual, eps, mode). The receiver spins with
//    acquire loads until the slot's sequence number reaches its own. A store never waits for the
//    slot to be consumed (no remote round trip): a sender is at most one call ahead, and a newer
//    sequence number also proves arrival. A rank whose call disagrees is reported by name
//    instead of reading garbage, and every wait has a timeout, so a peer that never comes is an
//    error, never a hang.
//  * The buffer has two halves, used alternately by successive calls (an epoch counter in
//    device memory, advanced by the last block of each call, so CUDA-graph replays alternate
//    too). Writing half h in call n is safe without a closing barrier: each block of call n-1
//    waited for every peer to arrive at call n-1, and a peer arrives only after finishing
//    call n-2 (stream order), the last reader of half h.
//
// Errors: wrong arguments raise c10::ValueError here; a disagreeing or missing peer prints the
// reason from the kernel and traps (the CUDA context is lost, as with any device-side assert).

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <cuda/atomic>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <optional>
#include <string>

namespace {

constexpr int kMaxWorld = 8;
constexpr int kMaxBlocks = 64;
constexpr int kBarriers = 2;
constexpr int kMaxThreads = 1024;
constexpr int kMaxChunksPerThread = 4;  // 16-byte chunks per thread: rows up to 64 KiB
constexpr int kSignalPadBytesNeeded = kBarriers * kMaxBlocks * kMaxWorld * 8;

enum class Mode { kLocal, kOneShot, kTwoShot };

struct Params {
  const void* x;
  const void* residual;  // may be null
  const void* weight;
  void* out;
  void* residual_out;
  int tokens;
  int hidden;
  float eps;
  int weight_dtype;  // 0 fp32, 1 bf16, 2 fp16
  // Symmetric memory (unused by kLocal): device arrays of the W peers' pointers.
  char* const* buffers;
  uint64_t* const* signal_pads;
  int64_t half_bytes;
  int rank;
  unsigned int* counters;  // [0] epoch (selects the buffer half), [1] blocks finished
  uint32_t descriptor;
  uint64_t timeout_ns;
};

// ---------------------------------------------------------------------------- element types

template <typename T>
struct Elem;
template <>
struct Elem<float> {
  static constexpr int kPerChunk = 4;
  static constexpr int kCode = 0;  // Params::weight_dtype
  __device__ static float to_float(float v) { return v; }
  __device__ static float from_float(float v) { return v; }
};
template <>
struct Elem<__nv_bfloat16> {
  static constexpr int kPerChunk = 8;
  static constexpr int kCode = 1;
  __device__ static float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }
  __device__ static __nv_bfloat16 from_float(float v) { return __float2bfloat16_rn(v); }
};
template <>
struct Elem<__half> {
  static constexpr int kPerChunk = 8;
  static constexpr int kCode = 2;
  __device__ static float to_float(__half v) { return __half2float(v); }
  __device__ static __half from_float(float v) { return __float2half_rn(v); }
};

template <typename T>
union Chunk {
  uint4 raw;
  T elems[Elem<T>::kPerChunk];
};

template <typename T>
__device__ __forceinline__ void chunk_to_float(const Chunk<T>& c, float* f) {
#pragma unroll
  for (int i = 0; i < Elem<T>::kPerChunk; ++i) f[i] = Elem<T>::to_float(c.elems[i]);
}

template <typename T>
__device__ __forceinline__ Chunk<T> chunk_from_float(const float* f) {
  Chunk<T> c;
#pragma unroll
  for (int i = 0; i < Elem<T>::kPerChunk; ++i) c.elems[i] = Elem<T>::from_float(f[i]);
  return c;
}

// Round each value to T and back: the rounding the reference does between its steps.
template <typename T>
__device__ __forceinline__ void round_to(float* f) {
#pragma unroll
  for (int i = 0; i < Elem<T>::kPerChunk; ++i) f[i] = Elem<T>::to_float(Elem<T>::from_float(f[i]));
}

__device__ __forceinline__ uint4 load_local(const void* p) { return *reinterpret_cast<const uint4*>(p); }

// Peers' buffers are written by other GPUs during this kernel: L2-only loads, never the
// non-coherent read-only path. Ordering comes from the barrier's acquire.
__device__ __forceinline__ uint4 load_shared(const void* p) { return __ldcg(reinterpret_cast<const uint4*>(p)); }

__device__ __forceinline__ void store(void* p, uint4 v) { *reinterpret_cast<uint4*>(p) = v; }

template <typename T>
// A weight of another dtype than x, element by element.
__device__ __forceinline__ void load_weight(const Params& p, int chunk, float* w) {
  constexpr int kN = Elem<T>::kPerChunk;
  const int first = chunk * kN;
  if (p.weight_dtype == 0) {
#pragma unroll
    for (int i = 0; i < kN; ++i) w[i] = reinterpret_cast<const float*>(p.weight)[first + i];
  } else if (p.weight_dtype == 1) {
#pragma unroll
    for (int i = 0; i < kN; ++i) w[i] = __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(p.weight)[first + i]);
  } else {
#pragma unroll
    for (int i = 0; i < kN; ++i) w[i] = __half2float(reinterpret_cast<const __half*>(p.weight)[first + i]);
  }
}

// PDL (docs/ops.md): every CTA waits for the grids before it, before it reads anything; a
// dependent grid may be released at any time, since its own wait orders it after this grid.
__device__ __forceinline__ void wait_for_prior_grids() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ void release_dependent_grids() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ------------------------------------------------------------------------------ barrier

__device__ __forceinline__ uint64_t global_ns() {
  uint64_t t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
  return t;
}

__device__ __noinline__ void fail(const Params& p, int peer, const char* what) {
  printf(
      "fusion_passes::fused_allreduce_rmsnorm: rank %d, block %d: %s (peer rank %d; this rank's call has "
      "T=%d, H=%d). Every rank must call it with the same shape, dtype, residual and eps, in the same order.\n",
      p.rank, static_cast<int>(blockIdx.x), what, peer, p.tokens, p.hidden);
  __trap();
}

__device__ __forceinline__ uint64_t* signal_slot(uint64_t* pad, int barrier, int block, int from_rank) {
  return pad + (barrier * kMaxBlocks + block) * kMaxWorld + from_rank;
}

// Block b of every rank meets block b of every other rank. On return, every write this block's
// peers made before arriving is visible to every thread of this block.
template <int W>
__device__ void block_barrier(const Params& p, int barrier, uint32_t sequence) {
  __syncthreads();
  const int peer = threadIdx.x;
  if (peer < W && peer != p.rank) {
    const uint64_t signal = (static_cast<uint64_t>(p.descriptor) << 32) | sequence;
    cuda::atomic_ref<uint64_t, cuda::thread_scope_system> outgoing(
        *signal_slot(p.signal_pads[peer], barrier, blockIdx.x, p.rank));
    cuda::atomic_ref<uint64_t, cuda::thread_scope_system> incoming(
        *signal_slot(p.signal_pads[p.rank], barrier, blockIdx.x, peer));
    outgoing.store(signal, cuda::memory_order_release);  // this block's writes happen before it
    const uint64_t start = global_ns();
    uint64_t seen;
    int32_t ahead;
    while ((ahead = static_cast<int32_t>(static_cast<uint32_t>(seen = incoming.load(cuda::memory_order_acquire)) -
                                         sequence)) < 0) {
      if (global_ns() - start > p.timeout_ns) fail(p, peer, "timed out waiting for the peer to arrive");
    }
    if (ahead == 0 && seen != signal) fail(p, peer, "the peer's call disagrees (shape, dtype, residual, eps or path)");
  }
  __syncthreads();
}

// ------------------------------------------------------------------------------- kernel

__device__ __forceinline__ float block_sum(float v, float* scratch) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();  // scratch is reused row after row
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  float total = 0.f;
  const int warps = (blockDim.x + 31) / 32;
  for (int i = 0; i < warps; ++i) total += scratch[i];  // same order in every thread and rank
  return total;
}

template <typename T, int W, Mode M, int kChunks = kMaxChunksPerThread>
__global__ void __launch_bounds__(kMaxThreads) allreduce_rmsnorm_kernel(Params p) {
  constexpr int kN = Elem<T>::kPerChunk;
  const int chunks = p.hidden / kN;
  const int64_t row_bytes = static_cast<int64_t>(p.hidden) * sizeof(T);
  const int rows_per_block = (p.tokens + gridDim.x - 1) / gridDim.x;
  const int row_begin = blockIdx.x * rows_per_block;
  const int row_end = min(p.tokens, row_begin + rows_per_block);
  __shared__ float scratch[kMaxThreads / 32];
  __shared__ unsigned int epoch;

  // The input region of rank r's current half, and (two-shot) its reduced region after it.
  auto input_row = [&](int r, int row) -> char* {
    return p.buffers[r] + (epoch & 1u) * p.half_bytes + row * row_bytes;
  };
  auto reduced_row = [&](int r, int row) -> char* {
    return p.buffers[r] + (epoch & 1u) * p.half_bytes + (static_cast<int64_t>(p.tokens) + row) * row_bytes;
  };
  const char* x = static_cast<const char*>(p.x);
  wait_for_prior_grids();  // PDL contract: nothing is read before it (a no-op unless launched with PDL)

  if constexpr (M != Mode::kLocal) {
    if (threadIdx.x == 0) epoch = *reinterpret_cast<volatile unsigned int*>(&p.counters[0]);
    __syncthreads();
    for (int row = row_begin; row < row_end; ++row)
      for (int c = threadIdx.x; c < chunks; c += blockDim.x)
        store(input_row(p.rank, row) + c * 16, load_local(x + row * row_bytes + c * 16));
    block_barrier<W>(p, 0, epoch + 1);  // sequence numbers start at 1: pads start zeroed
  }

  if constexpr (M == Mode::kTwoShot) {
    for (int row = row_begin + (p.rank - row_begin % W + W) % W; row < row_end; row += W) {
      for (int c = threadIdx.x; c < chunks; c += blockDim.x) {
        uint4 parts[W];
#pragma unroll
        for (int r = 0; r < W; ++r) parts[r] = load_shared(input_row(r, row) + c * 16);
        float sum[kN] = {};
#pragma unroll
        for (int r = 0; r < W; ++r) {
          Chunk<T> part;
          part.raw = parts[r];
          float f[kN];
          chunk_to_float(part, f);
#pragma unroll
          for (int i = 0; i < kN; ++i) sum[i] += f[i];
        }
        store(reduced_row(p.rank, row) + c * 16, chunk_from_float<T>(sum).raw);
      }
    }
    block_barrier<W>(p, 1, epoch + 1);
  }

  // r for one chunk of one row, in fp32, already rounded to T.
  auto reduced_chunk = [&](int row, int c, float* r) {
    if constexpr (M == Mode::kLocal) {
      Chunk<T> v;
      v.raw = load_local(x + row * row_bytes + c * 16);
      chunk_to_float(v, r);
    } else if constexpr (M == Mode::kTwoShot) {
      Chunk<T> v;
      v.raw = load_shared(reduced_row(row % W, row) + c * 16);
      chunk_to_float(v, r);
    } else {
      uint4 parts[W];
#pragma unroll
      for (int s = 0; s < W; ++s)
        parts[s] = s == p.rank ? load_local(x + row * row_bytes + c * 16) : load_shared(input_row(s, row) + c * 16);
#pragma unroll
      for (int i = 0; i < kN; ++i) r[i] = 0.f;
#pragma unroll
      for (int s = 0; s < W; ++s) {  // rank order, the same on every rank
        Chunk<T> part;
        part.raw = parts[s];
        float f[kN];
        chunk_to_float(part, f);
#pragma unroll
        for (int i = 0; i < kN; ++i) r[i] += f[i];
      }
      round_to<T>(r);
    }
  };

  // The symmetric modes are latency-bound: h is kept packed in registers (it is rounded to T
  // anyway), and so is a weight of x's dtype, prefetched during the block reduction. kLocal
  // streams many rows: it keeps neither and reads both again after the reduction (h from
  // residual_out, this thread's own store, an L2 hit; the weight an L1 hit): fewer registers
  // (64 when it held them), so more blocks are resident (docs/benchmarks.md, local norm).
  constexpr bool kReload = M == Mode::kLocal;
  const bool weight_packed = p.weight_dtype == Elem<T>::kCode;
  for (int row = row_begin; row < row_end; ++row) {
    Chunk<T> h[kChunks];
    uint4 weight_chunk[kChunks];
    float squares = 0.f;
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int c = threadIdx.x + j * blockDim.x;
      if (c < chunks) {
        Chunk<T> res;  // issued with the reduced chunk's loads, not after them
        if (p.residual != nullptr) res.raw = load_local(static_cast<const char*>(p.residual) + row * row_bytes + c * 16);
        float f[kN];
        reduced_chunk(row, c, f);
        if (p.residual != nullptr) {
          float r[kN];
          chunk_to_float(res, r);
#pragma unroll
          for (int i = 0; i < kN; ++i) f[i] += r[i];
        }
        h[j] = chunk_from_float<T>(f);
        store(static_cast<char*>(p.residual_out) + row * row_bytes + c * 16, h[j].raw);
        chunk_to_float(h[j], f);
#pragma unroll
        for (int i = 0; i < kN; ++i) squares += f[i] * f[i];
        if (!kReload && weight_packed) weight_chunk[j] = load_local(static_cast<const char*>(p.weight) + c * 16);
      }
    }
    const float inv_rms = rsqrtf(block_sum(squares, scratch) / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int c = threadIdx.x + j * blockDim.x;
      if (c < chunks) {
        float f[kN], w[kN];
        if constexpr (kReload) {
          h[j].raw = load_local(static_cast<const char*>(p.residual_out) + row * row_bytes + c * 16);
          if (weight_packed) weight_chunk[j] = load_local(static_cast<const char*>(p.weight) + c * 16);
        }
        chunk_to_float(h[j], f);
        if (weight_packed) {
          Chunk<T> packed;
          packed.raw = weight_chunk[j];
          chunk_to_float(packed, w);
        } else {
          load_weight<T>(p, c, w);
        }
#pragma unroll
        for (int i = 0; i < kN; ++i) f[i] = f[i] * inv_rms * w[i];
        store(static_cast<char*>(p.out) + row * row_bytes + c * 16, chunk_from_float<T>(f).raw);
      }
    }
  }

  if constexpr (M != Mode::kLocal) {
    // The last block to finish advances the epoch: the next call uses the other half.
    __syncthreads();
    if (threadIdx.x == 0 && gridDim.x == 1) {
      p.counters[0] += 1;  // alone: no other block to count
    } else if (threadIdx.x == 0) {
      __threadfence();
      if (atomicAdd(&p.counters[1], 1u) == gridDim.x - 1) {
        p.counters[1] = 0;
        p.counters[0] += 1;
        __threadfence();
      }
    }
  }
}

// ------------------------------------------------------ kLocal: add + RMSNorm of many rows
// The NCCL path's kernel (x already reduced) is a stream: it reads x, the residual and the
// weight and writes out and residual_out, so its time is DRAM bandwidth once T is large and
// one load latency when T is small. A row belongs to a group of `warps_per_row` warps (one
// warp for rows up to 32 * kChunks chunks), each lane holding kChunks 16-byte chunks of it:
// every load of a row is issued before the first use, h stays packed in registers, the sum of
// squares is reduced by shuffles (and, for several warps, one named barrier of those warps
// alone, through a double-buffered shared array), and no other barrier exists. A block holds
// several row groups; a grid of at most as many blocks as are resident walks the rows.
// Lane l of warp w in a group holds chunks (w * kChunks + j) * 32 + l: each load instruction
// of a warp reads 512 contiguous bytes, at a constant offset from the previous one.

constexpr int kRowGroupBlockThreads = 256;  // blocks of one-warp to eight-warp row groups
constexpr int kWideLaneChunks = 8;          // up to this many chunks a lane (at most 128 registers,
constexpr int kWideBlockThreads = 512;      // ptxas -v), groups of up to 16 warps: 64 KiB rows

template <int kChunks>
constexpr int row_group_max_threads() {
  return kChunks <= kWideLaneChunks ? kWideBlockThreads : kRowGroupBlockThreads;
}

// Makes v opaque to the compiler, so that h lives in registers as 4 packed words a chunk and
// is widened again where used, instead of as kPerChunk floats (twice the registers in bf16).
__device__ __forceinline__ void keep_packed(uint4& v) {
  asm volatile("" : "+r"(v.x), "+r"(v.y), "+r"(v.z), "+r"(v.w));
}

template <typename T, int kChunks>
__global__ void __launch_bounds__(row_group_max_threads<kChunks>())
    add_rmsnorm_rows_kernel(Params p, int warps_per_row) {
  constexpr int kN = Elem<T>::kPerChunk;
  __shared__ float warp_sums[2][kMaxThreads / 32];  // [row parity][warp of the block]
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int groups_per_block = blockDim.x / 32 / warps_per_row;
  const int group = warp / warps_per_row, warp_in_row = warp % warps_per_row;
  const int chunks = p.hidden / kN;
  const int64_t row_bytes = static_cast<int64_t>(p.hidden) * sizeof(T);
  const bool weight_packed = p.weight_dtype == Elem<T>::kCode;
  const int first_chunk = warp_in_row * kChunks * 32 + lane;  // chunk j: 512 * j bytes further

  wait_for_prior_grids();
  release_dependent_grids();  // the dependents' own wait still orders them after this grid
  int parity = 0;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * groups_per_block + group; row < p.tokens;
       row += static_cast<int64_t>(gridDim.x) * groups_per_block) {
    const char* x_row = static_cast<const char*>(p.x) + row * row_bytes;
    const char* residual_row = static_cast<const char*>(p.residual) + row * row_bytes;
    char* residual_out_row = static_cast<char*>(p.residual_out) + row * row_bytes;
    char* out_row = static_cast<char*>(p.out) + row * row_bytes;
    Chunk<T> h[kChunks], res[kChunks];
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {  // every load of the row in flight at once
      const int c = first_chunk + j * 32;
      if (c < chunks) {
        h[j].raw = load_local(x_row + c * 16);
        if (p.residual != nullptr) res[j].raw = load_local(residual_row + c * 16);
      }
    }
    float squares[kN] = {};  // one sum per element slot: kChunks-long chains, not kChunks * kN
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int c = first_chunk + j * 32;
      if (c < chunks) {
        float f[kN];
        chunk_to_float(h[j], f);
        if (p.residual != nullptr) {
          float r[kN];
          chunk_to_float(res[j], r);
#pragma unroll
          for (int i = 0; i < kN; ++i) f[i] += r[i];
        }
        h[j] = chunk_from_float<T>(f);
        store(residual_out_row + c * 16, h[j].raw);
        keep_packed(h[j].raw);
        chunk_to_float(h[j], f);
#pragma unroll
        for (int i = 0; i < kN; ++i) squares[i] += f[i] * f[i];
      }
    }
#pragma unroll
    for (int width = kN / 2; width > 0; width /= 2)
#pragma unroll
      for (int i = 0; i < width; ++i) squares[i] += squares[i + width];
    float total = squares[0];
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) total += __shfl_xor_sync(0xffffffffu, total, offset);
    if (warps_per_row > 1) {  // the group's warps in order; the parity keeps row i+1 off row i's sums
      if (lane == 0) warp_sums[parity][warp] = total;
      asm volatile("bar.sync %0, %1;" ::"r"(group + 1), "r"(warps_per_row * 32) : "memory");
      total = 0.f;
      for (int w = 0; w < warps_per_row; ++w) total += warp_sums[parity][group * warps_per_row + w];
      parity ^= 1;
    }
    const float inv_rms = rsqrtf(total / static_cast<float>(p.hidden) + p.eps);
#pragma unroll
    for (int j = 0; j < kChunks; ++j) {
      const int c = first_chunk + j * 32;
      if (c < chunks) {
        float f[kN], w[kN];
        if (weight_packed) {  // an L1 hit after the first row; a coherent load, so that it is
          Chunk<T> packed;    // not hoisted out of the row loop into kChunks * 4 more registers
          packed.raw = load_local(static_cast<const char*>(p.weight) + c * 16);
          chunk_to_float(packed, w);
        } else {
          load_weight<T>(p, c, w);
        }
        chunk_to_float(h[j], f);
#pragma unroll
        for (int i = 0; i < kN; ++i) f[i] = f[i] * inv_rms * w[i];
        store(out_row + c * 16, chunk_from_float<T>(f).raw);
      }
    }
  }
}

// -------------------------------------------------------------------------------- host

// Few rows are latency: as few chunks a thread as the widest block allows. Many rows in the
// local mode (one block a row) are bandwidth: two chunks a thread, so more blocks (and loads)
// are in flight per SM. On H100 (H = 2880 bf16, T = 512-8192) two chunks and one row a block
// came closest to Inductor's norm at every T but 1024 (docs/benchmarks.md, local norm). The
// symmetric modes have at most kMaxBlocks blocks and stay wide.
constexpr int kManyRows = 512;
constexpr int kManyRowsChunksPerThread = 2;

int threads_for(int chunks, int64_t rows) {
  const int few_rows_per_thread = (chunks + kMaxThreads - 1) / kMaxThreads;
  const int per_thread =
      rows >= kManyRows ? std::max(kManyRowsChunksPerThread, few_rows_per_thread) : few_rows_per_thread;
  int threads = std::min((chunks + per_thread - 1) / per_thread, kMaxThreads);
  return ((threads + 31) / 32) * 32;
}

// kLocal's layout. chunks_per_lane = 0: the block-a-row kernel above (one block a row, a block
// reduction); otherwise add_rmsnorm_rows_kernel with row groups of as few warps as keep a lane
// at most that many chunks. persistent: at most as many blocks as are resident at once, each
// walking rows (else one block a group of rows). pdl: launched with programmatic stream
// serialization. Set only by the benchmark and the tests, to compare layouts in one run.
struct LocalLayout {
  int chunks_per_lane = 8;
  bool persistent = true;
  bool pdl = true;
};
std::atomic<int> g_local_chunks_per_lane{LocalLayout{}.chunks_per_lane};
std::atomic<bool> g_local_persistent{LocalLayout{}.persistent};
std::atomic<bool> g_local_pdl{LocalLayout{}.pdl};

constexpr int kLaneChunkKernels[] = {1, 2, 3, 4, 6, 8, 12, 16};  // instantiated chunks a lane

template <typename Kernel>
void launch_rows(Kernel kernel, int64_t row_groups, int threads, bool persistent, bool pdl, const Params& p,
                 int warps_per_row, cudaStream_t stream) {
  int64_t grid = row_groups;
  if (persistent) {
    int resident = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, kernel, threads, 0));
    int device = 0, sms = 0;
    C10_CUDA_CHECK(cudaGetDevice(&device));
    C10_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
    grid = std::min<int64_t>(grid, static_cast<int64_t>(std::max(resident, 1)) * sms);
  }
  grid = std::min<int64_t>(grid, INT32_MAX);
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(grid));
  config.blockDim = dim3(threads);
  config.stream = stream;
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute.val.programmaticStreamSerializationAllowed = 1;
  config.attrs = &attribute;
  config.numAttrs = pdl ? 1 : 0;
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, kernel, p, warps_per_row));
}

template <typename T>
void launch_local_rows(int max_chunks_per_lane, bool persistent, bool pdl, const Params& p, cudaStream_t stream) {
  const int chunks = p.hidden / Elem<T>::kPerChunk;
  auto warps_for = [&](int lane_chunks) {
    int warps = 1;
    while (warps * 32 * lane_chunks < chunks) warps *= 2;
    return warps;
  };
  int warps_per_row = warps_for(max_chunks_per_lane);
  while (warps_per_row * 32 > kWideBlockThreads) {  // a row too long for that few chunks a lane
    max_chunks_per_lane *= 2;
    warps_per_row = warps_for(max_chunks_per_lane);
  }
  const int needed = (chunks + warps_per_row * 32 - 1) / (warps_per_row * 32);
  const int threads = std::max(kRowGroupBlockThreads, warps_per_row * 32);
  const int64_t groups_per_block = threads / 32 / warps_per_row;
  const int64_t row_groups = (p.tokens + groups_per_block - 1) / groups_per_block;
  int lane_chunks = 0;
  for (int k : kLaneChunkKernels) {
    if (k >= needed) {
      lane_chunks = k;
      break;
    }
  }
  switch (lane_chunks) {
#define FUSION_PASSES_LANE_CHUNKS(K)                                                                                 \
  case K:                                                                                                            \
    launch_rows(add_rmsnorm_rows_kernel<T, K>, row_groups, threads, persistent, pdl, p, warps_per_row, stream); \
    break;
    FUSION_PASSES_LANE_CHUNKS(1)
    FUSION_PASSES_LANE_CHUNKS(2)
    FUSION_PASSES_LANE_CHUNKS(3)
    FUSION_PASSES_LANE_CHUNKS(4)
    FUSION_PASSES_LANE_CHUNKS(6)
    FUSION_PASSES_LANE_CHUNKS(8)
    FUSION_PASSES_LANE_CHUNKS(12)
    FUSION_PASSES_LANE_CHUNKS(16)
#undef FUSION_PASSES_LANE_CHUNKS
    default:
      TORCH_CHECK(false, "fused_add_rmsnorm: no kernel for ", needed, " chunks a lane");
  }
}

template <typename T, Mode M>
void launch_for_world(int world, int grid, int threads, const Params& p, cudaStream_t stream) {
  switch (world) {
#define FUSION_PASSES_WORLD(W)                                          \
  case W:                                                               \
    allreduce_rmsnorm_kernel<T, W, M><<<grid, threads, 0, stream>>>(p); \
    break;
    FUSION_PASSES_WORLD(2)
    FUSION_PASSES_WORLD(3)
    FUSION_PASSES_WORLD(4)
    FUSION_PASSES_WORLD(5)
    FUSION_PASSES_WORLD(6)
    FUSION_PASSES_WORLD(7)
    FUSION_PASSES_WORLD(8)
#undef FUSION_PASSES_WORLD
  }
}

template <typename T>
void launch(Mode mode, int world, int grid, int threads, const Params& p, cudaStream_t stream) {
  if (mode == Mode::kLocal) {  // registers sized to the chunks a thread holds (38-56 on sm_90a)
    const int per_thread = (p.hidden * static_cast<int>(sizeof(T)) / 16 + threads - 1) / threads;
    if (per_thread <= 1) {
      allreduce_rmsnorm_kernel<T, 1, Mode::kLocal, 1><<<grid, threads, 0, stream>>>(p);
    } else if (per_thread == 2) {
      allreduce_rmsnorm_kernel<T, 1, Mode::kLocal, 2><<<grid, threads, 0, stream>>>(p);
    } else {
      allreduce_rmsnorm_kernel<T, 1, Mode::kLocal><<<grid, threads, 0, stream>>>(p);
    }
  } else if (mode == Mode::kOneShot) {
    launch_for_world<T, Mode::kOneShot>(world, grid, threads, p, stream);
  } else {
    launch_for_world<T, Mode::kTwoShot>(world, grid, threads, p, stream);
  }
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

int weight_dtype_code(at::ScalarType t) {
  if (t == at::kFloat) return 0;
  if (t == at::kBFloat16) return 1;
  if (t == at::kHalf) return 2;
  return -1;
}

// Checks shared by both entry points; fills the non-communication part of Params.
Params row_params(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight, double eps,
                  at::Tensor& out, at::Tensor& residual_out) {
  const std::string op = "fused_allreduce_rmsnorm: ";
  TORCH_CHECK_VALUE(x.is_cuda() && x.dim() == 2 && x.is_contiguous(), op + "x must be a contiguous 2-D CUDA tensor");
  const auto dtype = x.scalar_type();
  TORCH_CHECK_VALUE(dtype == at::kFloat || dtype == at::kBFloat16 || dtype == at::kHalf,
                    op + "x must be float32, bfloat16 or float16");
  const int64_t tokens = x.size(0), hidden = x.size(1);
  const int64_t row_bytes = hidden * x.element_size();
  TORCH_CHECK_VALUE(row_bytes % 16 == 0 && row_bytes / 16 <= int64_t{kMaxThreads} * kMaxChunksPerThread,
                    op + "rows must be a multiple of 16 bytes and at most 64 KiB, got H=" + std::to_string(hidden));
  TORCH_CHECK_VALUE(weight.dim() == 1 && weight.size(0) == hidden && weight.is_contiguous() &&
                        weight_dtype_code(weight.scalar_type()) >= 0 && weight.device() == x.device(),
                    op + "weight must be a contiguous float tensor [H]=" + std::to_string(hidden));
  for (const at::Tensor* t : std::initializer_list<const at::Tensor*>{&x, &out, &residual_out}) {
    TORCH_CHECK_VALUE(t->sizes() == x.sizes() && t->scalar_type() == dtype && t->is_contiguous() && aligned16(*t) &&
                          t->device() == x.device(),
                      op + "x, out and residual_out must be contiguous, 16-byte aligned and alike");
  }
  if (residual.has_value()) {
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes() && residual->scalar_type() == dtype && residual->is_contiguous() &&
                          aligned16(*residual) && residual->device() == x.device(),
                      op + "residual must be contiguous, 16-byte aligned and like x");
  }
  TORCH_CHECK_VALUE(tokens <= INT32_MAX && tokens * row_bytes < (int64_t{1} << 40), op + "x is too large");
  Params p{};
  p.x = x.data_ptr();
  p.residual = residual.has_value() ? residual->data_ptr() : nullptr;
  p.weight = weight.data_ptr();
  p.out = out.data_ptr();
  p.residual_out = residual_out.data_ptr();
  p.tokens = static_cast<int>(tokens);
  p.hidden = static_cast<int>(hidden);
  p.eps = static_cast<float>(eps);
  p.weight_dtype = weight_dtype_code(weight.scalar_type());
  return p;
}

void dispatch(Mode mode, int world, int grid, const at::Tensor& x, const Params& p) {
  if (p.tokens == 0) return;
  const c10::cuda::CUDAGuard guard(x.device());
  const int chunks = static_cast<int>(p.hidden * x.element_size() / 16);
  const int threads = threads_for(chunks, mode == Mode::kLocal ? p.tokens : 0);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const int local_chunks_per_lane = g_local_chunks_per_lane.load(std::memory_order_relaxed);
  if (mode == Mode::kLocal && local_chunks_per_lane > 0) {
    const bool persistent = g_local_persistent.load(std::memory_order_relaxed);
    const bool pdl = g_local_pdl.load(std::memory_order_relaxed);
    switch (x.scalar_type()) {
      case at::kFloat:
        launch_local_rows<float>(local_chunks_per_lane, persistent, pdl, p, stream);
        break;
      case at::kBFloat16:
        launch_local_rows<__nv_bfloat16>(local_chunks_per_lane, persistent, pdl, p, stream);
        break;
      default:
        launch_local_rows<__half>(local_chunks_per_lane, persistent, pdl, p, stream);
    }
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    return;
  }
  switch (x.scalar_type()) {
    case at::kFloat:
      launch<float>(mode, world, grid, threads, p, stream);
      break;
    case at::kBFloat16:
      launch<__nv_bfloat16>(mode, world, grid, threads, p, stream);
      break;
    default:
      launch<__half>(mode, world, grid, threads, p, stream);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// x already all-reduced (the NCCL path): add the residual and normalize, one kernel.
void fused_add_rmsnorm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                       double eps, at::Tensor out, at::Tensor residual_out) {
  Params p = row_params(x, residual, weight, eps, out, residual_out);
  const int grid = static_cast<int>(std::min<int64_t>(x.size(0), 65535 * 8));
  dispatch(Mode::kLocal, 1, std::max(grid, 1), x, p);
}

uint32_t describe(const at::Tensor& x, bool has_residual, double eps, int64_t algorithm) {
  const float eps_f = static_cast<float>(eps);
  uint32_t eps_bits;
  std::memcpy(&eps_bits, &eps_f, sizeof(eps_bits));
  uint32_t h = 2166136261u;  // FNV-1a over the fields every rank must agree on
  for (uint64_t v : {static_cast<uint64_t>(x.size(0)), static_cast<uint64_t>(x.size(1)),
                     static_cast<uint64_t>(x.scalar_type()), static_cast<uint64_t>(has_residual),
                     static_cast<uint64_t>(eps_bits), static_cast<uint64_t>(algorithm)}) {
    for (int i = 0; i < 8; ++i) h = (h ^ ((v >> (8 * i)) & 0xffu)) * 16777619u;
  }
  return h;
}

// One-shot (algorithm 1) or two-shot (2) over a symmetric-memory buffer; see the file comment.
void symm_allreduce_rmsnorm(const at::Tensor& x, const std::optional<at::Tensor>& residual, const at::Tensor& weight,
                            double eps, at::Tensor out, at::Tensor residual_out, int64_t buffer_ptrs_dev,
                            int64_t signal_pad_ptrs_dev, int64_t half_bytes, int64_t signal_pad_bytes, int64_t rank,
                            int64_t world_size, at::Tensor counters, int64_t algorithm, int64_t max_blocks,
                            double timeout_s) {
  const std::string op = "fused_allreduce_rmsnorm: ";
  Params p = row_params(x, residual, weight, eps, out, residual_out);
  TORCH_CHECK_VALUE(algorithm == 1 || algorithm == 2, op + "algorithm must be 1 (one-shot) or 2 (two-shot)");
  TORCH_CHECK_VALUE(world_size >= 2 && world_size <= kMaxWorld && rank >= 0 && rank < world_size,
                    op + "world size must be 2.." + std::to_string(kMaxWorld) + ", got " + std::to_string(world_size));
  TORCH_CHECK_VALUE(max_blocks >= 1 && max_blocks <= kMaxBlocks, op + "max_blocks must be 1.." + std::to_string(kMaxBlocks));
  TORCH_CHECK_VALUE(signal_pad_bytes >= kSignalPadBytesNeeded,
                    op + "signal pads need " + std::to_string(kSignalPadBytesNeeded) + " bytes");
  const int64_t regions = algorithm == 2 ? 2 : 1;
  TORCH_CHECK_VALUE(regions * x.numel() * x.element_size() <= half_bytes,
                    op + "x does not fit the workspace: " + std::to_string(x.numel() * x.element_size()) +
                        " bytes x " + std::to_string(regions) + " regions > " + std::to_string(half_bytes));
  TORCH_CHECK_VALUE(counters.is_cuda() && counters.scalar_type() == at::kInt && counters.numel() == 2 &&
                        counters.device() == x.device(),
                    op + "counters must be int32 [2] on x's device");
  p.buffers = reinterpret_cast<char* const*>(buffer_ptrs_dev);
  p.signal_pads = reinterpret_cast<uint64_t* const*>(signal_pad_ptrs_dev);
  p.half_bytes = half_bytes;
  p.rank = static_cast<int>(rank);
  p.counters = reinterpret_cast<unsigned int*>(counters.data_ptr<int32_t>());
  p.descriptor = describe(x, residual.has_value(), eps, algorithm);
  p.timeout_ns = static_cast<uint64_t>(timeout_s * 1e9);
  const int64_t tokens = x.size(0);
  // Two-shot blocks take W rows each at least, so every rank owns a row in every full block.
  const int64_t rows_per_block = algorithm == 2 ? world_size : 1;
  const int grid = static_cast<int>(std::min<int64_t>((tokens + rows_per_block - 1) / rows_per_block, max_blocks));
  dispatch(algorithm == 1 ? Mode::kOneShot : Mode::kTwoShot, static_cast<int>(world_size), std::max(grid, 1), x, p);
}

int64_t signal_pad_bytes_needed() { return kSignalPadBytesNeeded; }

void set_local_layout(int64_t chunks_per_lane, bool persistent, bool pdl) {
  TORCH_CHECK_VALUE(chunks_per_lane == 0 || chunks_per_lane == 2 || chunks_per_lane == 4 || chunks_per_lane == 8 ||
                        chunks_per_lane == 16,
                    "fused_add_rmsnorm: chunks_per_lane must be 0 (one block a row), 2, 4, 8 or 16, got ",
                    std::to_string(chunks_per_lane));
  g_local_chunks_per_lane.store(static_cast<int>(chunks_per_lane));
  g_local_persistent.store(persistent);
  g_local_pdl.store(pdl);
}

void reset_local_layout() {
  const LocalLayout shipped;
  set_local_layout(shipped.chunks_per_lane, shipped.persistent, shipped.pdl);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fusion_passes, m) {
  m.def(
      "_fused_add_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps, Tensor(a!) out, "
      "Tensor(b!) residual_out) -> ()");
  m.def(
      "_symm_allreduce_rmsnorm(Tensor x, Tensor? residual, Tensor weight, float eps, Tensor(a!) out, "
      "Tensor(b!) residual_out, int buffer_ptrs_dev, int signal_pad_ptrs_dev, int half_bytes, "
      "int signal_pad_bytes, int rank, int world_size, Tensor(c!) counters, int algorithm, int max_blocks, "
      "float timeout_s) -> ()");
  m.def("_symm_allreduce_signal_pad_bytes() -> int", &signal_pad_bytes_needed);
  m.def("_fused_add_rmsnorm_set_layout(int chunks_per_lane, bool persistent, bool pdl) -> ()", &set_local_layout);
  m.def("_fused_add_rmsnorm_reset_layout() -> ()", &reset_local_layout);
}

TORCH_LIBRARY_IMPL(fusion_passes, CUDA, m) {
  m.impl("_fused_add_rmsnorm", &fused_add_rmsnorm);
  m.impl("_symm_allreduce_rmsnorm", &symm_allreduce_rmsnorm);
}
