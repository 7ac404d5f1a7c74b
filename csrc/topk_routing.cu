// fusion_passes::topk_routing on CUDA: NaN-safe softmax/sigmoid top-k routing in one launch.
//
// Semantics: exactly those of `topk_routing_reference` in fusion_passes/ops.py (its docstring is
// the specification). In scope for the kernel: logits fp32/bf16/fp16, 1 <= E <= 512, k <= 32,
// correction bias fp32/bf16/fp16/fp64. Anything else valid runs `topk_routing_composite` below,
// the reference written with ATen ops, so valid input never errors.
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
//  * Weights: lane r < k computes p of its expert with an exp within 1 ulp (range reduction,
//    degree-7 polynomial; the --use_fast_math __expf loses |t|*1e-7 relative) and IEEE division
//    and addition in inline PTX without .ftz, so subnormal probabilities and sums come out as
//    the reference computes them (--use_fast_math flushes subnormals in C++ arithmetic).
//    Renormalization sums over the k lanes; a zero sum gives 1/k (rounded from double on the
//    host, as Python does).
//  * Without a bias the keys decode back to the clamped logits: round 0 yields the softmax max,
//    lane r's entry its expert's logit, and for renormalized softmax weights, exp(x - max) / their
//    sum, the softmax denominator cancels: that path (the common one) has no pass over the row
//    after the rounds. Otherwise the softmax sum takes an exp of about 2 ulp (ex2.approx
//    corrected for the rounding of t*log2(e)) and a warp reduction; with a bias, p + bias of
//    every expert is needed before the rounds, and lane r reloads its logit.
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

#include <cfloat>
#include <cstdint>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>

namespace {

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 4;
constexpr int kThreadsPerBlock = kRowsPerBlock * kWarpSize;
constexpr int kMaxExperts = 16 * kWarpSize;  // 512
constexpr int kMaxK = kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr uint32_t kTakenKey = 0;
constexpr uint32_t kInvalidKey = 1;
constexpr uint32_t kIndexMask = kMaxExperts - 1;  // the entry bits of 511 - e

enum class LogitFormat { kFloat32, kBFloat16, kFloat16 };
enum class BiasFormat : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

struct RoutingParams {
  const void* logits;
  int64_t row_stride;  // in elements
  int64_t num_rows;
  int num_experts;
  int k;
  int k_lanes;       // power of two >= k
  const void* bias;  // [E] contiguous, or nullptr
  BiasFormat bias_format;
  bool renormalize;
  bool vector_loads;
  float uniform_weight;  // 1/k rounded from double, the weight of a row whose weights sum to 0
  float* weights;        // [T, k]
  int64_t* ids;          // [T, k]
};

// ------------------------------------------------------------------ float helpers (fast-math proof)

__device__ __forceinline__ bool is_nan(float v) {
  return (__float_as_uint(v) & 0x7fffffffu) > 0x7f800000u;
}

__device__ __forceinline__ float clamp_infinity(float v) {
  const uint32_t bits = __float_as_uint(v);
  return (bits & 0x7fffffffu) == 0x7f800000u ? __uint_as_float((bits & 0x80000000u) | 0x7f7fffffu) : v;
}

// Order-preserving key of a non-infinite float: finite values map above kInvalidKey (the key of
// -FLT_MAX is 0x00800000), NaN maps to kInvalidKey, -0 and +0 share a key.
__device__ __forceinline__ uint32_t score_key(float v) {
  uint32_t bits = __float_as_uint(v);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude > 0x7f800000u) return kInvalidKey;
  if (magnitude == 0) bits = 0;
  return (bits & 0x80000000u) ? ~bits : (bits | 0x80000000u);
}

__device__ __forceinline__ float key_to_float(uint32_t key) {
  return __uint_as_float((key & 0x80000000u) ? (key & 0x7fffffffu) : ~key);
}

// IEEE round-to-nearest operations that keep subnormal inputs and results (no .ftz).
__device__ __forceinline__ float add_keep_subnormal(float a, float b) {
  float d;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float mul_keep_subnormal(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float div_keep_subnormal(float a, float b) {
  float d;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

constexpr float kLog2e = 1.44269502162933349609375f;  // log2(e) rounded to float
constexpr float kLog2eLo = 1.925963033500011e-08f;    // log2(e) - kLog2e
constexpr float kLn2 = 0.693147182464599609375f;

// exp(t) within about 2 ulp, for the softmax sum and the selection scores of a correction bias
// (not for the weights): 2^h by ex2.approx with h = t*log2(e) rounded, times 1 + d*ln2 for the
// rounding error d of h (plain __expf loses |t|*1e-7 relative there). Subnormal results are 0,
// like the rest of the fast-math arithmetic; t is clamped to [-104, 88.5], where the results
// are 0 and finite.
__device__ __forceinline__ float exp_flush_subnormal(float t) {
  t = fminf(fmaxf(t, -104.0f), 88.5f);
  const float h = t * kLog2e;
  const float d = fmaf(t, kLog2eLo, fmaf(t, kLog2e, -h));
  float e;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(e) : "f"(h));
  return fmaf(e, d * kLn2, e);
}

// exp(t) within 1 ulp for every t (NaN excluded), as IEEE expf: subnormal results are kept and
// huge ones overflow to +inf. t = j*ln2 + r with |r| <= ln2/2, exp(r) by its Taylor polynomial
// of degree 7 (truncation error < 0.1 ulp), then scaled by 2^j in two steps whose second is a
// correctly rounded non-.ftz multiply. For the k weights of a row.
__device__ __forceinline__ float exp_accurate(float t) {
  constexpr float kLn2Hi = 0.693145751953125f;  // 15 significant bits: j*kLn2Hi is exact
  constexpr float kLn2Lo = 1.428606765330187e-06f;
  t = fminf(fmaxf(t, -104.0f), 89.0f);  // exp(-104) rounds to 0, exp(89) overflows
  const float j = rintf(t * kLog2e);
  float r = fmaf(j, -kLn2Hi, t);
  r = fmaf(j, -kLn2Lo, r);
  float e = 1.0f / 5040.0f;
  e = fmaf(e, r, 1.0f / 720.0f);
  e = fmaf(e, r, 1.0f / 120.0f);
  e = fmaf(e, r, 1.0f / 24.0f);
  e = fmaf(e, r, 1.0f / 6.0f);
  e = fmaf(e, r, 0.5f);
  e = fmaf(e, r, 1.0f);
  e = fmaf(e, r, 1.0f);  // e in [0.70, 1.42]
  const int n = static_cast<int>(j);  // [-150, 129]
  const int half = n >> 1;            // [-75, 64]: both factors are normal floats
  const float scale_a = __int_as_float((half + 127) << 23);
  const float scale_b = __int_as_float((n - half + 127) << 23);
  return mul_keep_subnormal(e * scale_a, scale_b);  // e * scale_a is exact
}

// ------------------------------------------------------------------------------------ loading

template <LogitFormat F>
using LogitStorage = std::conditional_t<F == LogitFormat::kFloat32, uint32_t, uint16_t>;

template <LogitFormat F>
__device__ __forceinline__ float logit_to_float(LogitStorage<F> bits) {
  if constexpr (F == LogitFormat::kFloat32) {
    return __uint_as_float(bits);
  } else if constexpr (F == LogitFormat::kBFloat16) {
    return __uint_as_float(static_cast<uint32_t>(bits) << 16);
  } else {
    return __half2float(__ushort_as_half(bits));
  }
}

// A NaN in every format: the contents of the slots past E.
template <LogitFormat F>
constexpr LogitStorage<F> kNanBits = F == LogitFormat::kFloat32 ? 0x7fffffffu : 0x7fffu;

// Order-preserving 16-bit key of a bf16 or fp16 logit, the same order as the clamped fp32 value
// (+-Inf sit just beyond the largest finite 16-bit values, where +-FLT_MAX sits): finite and
// infinite values map to [0x7f, 0xff80] (bf16) or [0x3ff, 0xfc00] (fp16), all above
// kInvalidKey; NaN maps to kInvalidKey; -0 and +0 share a key. Branch-free: a negative
// nonzero value (bits > 0x8000) flips its magnitude bits, anything else gets the sign bit.
template <LogitFormat F>
__device__ __forceinline__ uint32_t half_key(uint32_t bits) {
  constexpr uint32_t kInfinityBits = F == LogitFormat::kBFloat16 ? 0x7f80u : 0x7c00u;
  const uint32_t magnitude = bits & 0x7fffu;
  const uint32_t key = magnitude ^ (bits > 0x8000u ? 0x7fffu : 0x8000u);
  return magnitude > kInfinityBits ? kInvalidKey : key;
}

// The clamped fp32 logit of a half_key above kInvalidKey.
template <LogitFormat F>
__device__ __forceinline__ float half_key_to_float(uint32_t key) {
  const uint32_t bits = (key & 0x8000u) ? (key & 0x7fffu) : (~key & 0xffffu);
  return clamp_infinity(logit_to_float<F>(static_cast<uint16_t>(bits)));
}

// The clamped fp32 logit of a selection key above kInvalidKey, made without a bias.
template <LogitFormat F, bool kHalfKeys>
__device__ __forceinline__ float key_to_logit(uint32_t key) {
  if constexpr (kHalfKeys) {
    return half_key_to_float<F>(key);
  } else {
    return key_to_float(key);
  }
}

template <typename S, int N>
struct alignas(sizeof(S) * N) Packet {
  S v[N];
};

// Elements per vector load: the largest power of two that divides VPL and fits in 16 bytes.
template <LogitFormat F, int VPL>
constexpr int vector_width() {
  constexpr int max_width = 16 / static_cast<int>(sizeof(LogitStorage<F>));
  int width = 1;
  while (width * 2 <= max_width && VPL % (width * 2) == 0) width *= 2;
  return width;
}

// Loads the raw bits of the lane's experts [first, first + VPL) of one row; slots past E get NaN.
template <LogitFormat F, int VPL>
__device__ __forceinline__ void load_logits(const LogitStorage<F>* row, int first, int num_experts, bool vector_loads,
                                            LogitStorage<F> (&raw)[VPL]) {
  using S = LogitStorage<F>;
  constexpr int kWidth = vector_width<F, VPL>();
  if (kWidth > 1 && vector_loads) {
    // The host guarantees: E % kWidth == 0 and the row start is kWidth-element aligned.
#pragma unroll
    for (int c = 0; c < VPL / kWidth; ++c) {
      const int e = first + c * kWidth;
      Packet<S, kWidth> packet;
      if (e < num_experts) {
        packet = *reinterpret_cast<const Packet<S, kWidth>*>(row + e);
      } else {
#pragma unroll
        for (int i = 0; i < kWidth; ++i) packet.v[i] = kNanBits<F>;
      }
#pragma unroll
      for (int i = 0; i < kWidth; ++i) raw[c * kWidth + i] = packet.v[i];
    }
  } else {
#pragma unroll
    for (int j = 0; j < VPL; ++j) raw[j] = first + j < num_experts ? row[first + j] : kNanBits<F>;
  }
}

__device__ __forceinline__ float load_bias(const void* bias, BiasFormat format, int e) {
  switch (format) {
    case BiasFormat::kFloat32:
      return __ldg(static_cast<const float*>(bias) + e);
    case BiasFormat::kBFloat16:
      return __uint_as_float(static_cast<uint32_t>(__ldg(static_cast<const unsigned short*>(bias) + e)) << 16);
    case BiasFormat::kFloat16:
      return __half2float(__ushort_as_half(__ldg(static_cast<const unsigned short*>(bias) + e)));
    default:
      return __double2float_rn(__ldg(static_cast<const double*>(bias) + e));
  }
}

// ------------------------------------------------------------------------------ warp helpers

// Sum over all lanes, result in each.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

// Sum over lanes [0, lanes) (a power of two) without flushing subnormals, result in each of them.
__device__ __forceinline__ float warp_sum_keep_subnormal(float v, int lanes) {
  for (int offset = lanes / 2; offset > 0; offset /= 2) v = add_keep_subnormal(v, __shfl_xor_sync(kFullMask, v, offset));
  return v;
}

// exp(x - row_max) of the lane's slots into `terms` (NaN and padding slots give exp(-104) = 0,
// as fast-math flushes it); returns their sum over the row.
template <int VPL>
__device__ __forceinline__ float softmax_exp_sum(const float (&x)[VPL], float row_max, float (&terms)[VPL]) {
  float lane_sum = 0.0f;
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    terms[j] = exp_flush_subnormal(is_nan(x[j]) ? -104.0f : x[j] - row_max);
    lane_sum += terms[j];
  }
  return warp_sum(lane_sum);
}

__device__ __forceinline__ void wait_for_prior_grids() { asm volatile("griddepcontrol.wait;" ::: "memory"); }

__device__ __forceinline__ void release_dependent_grids() {
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
}

// ------------------------------------------------------------------------------------ entries

// The entry of expert e with selection key `key`: 32 bits for a 16-bit key, else 64.
template <typename Entry>
constexpr int kKeyShift = sizeof(Entry) == 4 ? 16 : 32;

template <typename Entry>
__device__ __forceinline__ Entry make_entry(uint32_t key, int e) {
  return (static_cast<Entry>(key) << kKeyShift<Entry>) + static_cast<Entry>(kIndexMask - e);  // + is |: no overlap
}

template <typename Entry>
__device__ __forceinline__ uint32_t entry_key(Entry entry) {
  return static_cast<uint32_t>(entry >> kKeyShift<Entry>);
}

template <typename Entry>
__device__ __forceinline__ int entry_expert(Entry entry) {
  return static_cast<int>(kIndexMask - (static_cast<uint32_t>(entry) & kIndexMask));
}

// Batcher's odd-even merge sorting network for the next power of two >= N, without the
// comparators that reach past N: those would meet a padding minimum at the end, which never
// moves, so they are no-ops. Comparator c orders the pair (first[c], second[c]).
struct SortingNetwork {
  int size = 0;
  int first[64] = {};
  int second[64] = {};
};

template <int N>
constexpr SortingNetwork make_sorting_network() {
  static_assert(N >= 1 && N <= 16, "sorting networks of at most 16 entries");
  int pow2 = 1;
  while (pow2 < N) pow2 *= 2;
  SortingNetwork network;
  for (int merged = 1; merged < pow2; merged *= 2) {
    for (int gap = merged; gap >= 1; gap /= 2) {
      for (int start = gap % merged; start + gap < pow2; start += 2 * gap) {
        for (int i = 0; i < gap; ++i) {
          const int a = start + i;
          const int b = a + gap;
          // Only pairs inside one block of 2*merged entries, and none past N.
          if (b < N && a / (2 * merged) == b / (2 * merged)) {
            network.first[network.size] = a;
            network.second[network.size] = b;
            ++network.size;
          }
        }
      }
    }
  }
  return network;
}

template <int N>
constexpr SortingNetwork kSortingNetwork = make_sorting_network<N>();

template <int A, int B, int N, typename Entry>
__device__ __forceinline__ void order_pair(Entry (&v)[N]) {
  const Entry high = v[A] > v[B] ? v[A] : v[B];
  const Entry low = v[A] > v[B] ? v[B] : v[A];
  v[A] = high;
  v[B] = low;
}

template <int N, typename Entry, int... C>
__device__ __forceinline__ void apply_sorting_network(Entry (&v)[N], std::integer_sequence<int, C...>) {
  // Indices as template arguments: every register of v is addressed at compile time.
  (order_pair<kSortingNetwork<N>.first[C], kSortingNetwork<N>.second[C]>(v), ...);
}

// Sorts N entries in descending order.
template <int N, typename Entry>
__device__ __forceinline__ void sort_descending(Entry (&v)[N]) {
  apply_sorting_network(v, std::make_integer_sequence<int, kSortingNetwork<N>.size>{});
}

// ------------------------------------------------------------------------------------- kernel

template <LogitFormat F, int VPL, bool kSigmoid, bool kHasBias>
__global__ void __launch_bounds__(kThreadsPerBlock) topk_routing_kernel(const RoutingParams p) {
  using S = LogitStorage<F>;
  // Without a bias a 16-bit logit is its own exact 16-bit selection key.
  constexpr bool kHalfKeys = F != LogitFormat::kFloat32 && !kHasBias;
  using Entry = std::conditional_t<kHalfKeys, uint32_t, uint64_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.num_rows) return;  // whole warps leave; nothing below synchronizes the block
  const S* row_logits = static_cast<const S*>(p.logits) + row * p.row_stride;
  const int first = lane * VPL;
  wait_for_prior_grids();
  release_dependent_grids();

  S raw[VPL];
  load_logits<F, VPL>(row_logits, first, p.num_experts, p.vector_loads, raw);
  float x[VPL];  // clamped logits, NaN in padding slots (only the paths that need them keep them)
#pragma unroll
  for (int j = 0; j < VPL; ++j) x[j] = clamp_infinity(logit_to_float<F>(raw[j]));

  // The lane's entries; with a correction bias the softmax statistics (max and sum of
  // exp(x - max) over the valid logits) come first.
  Entry list[VPL];
  float row_max = 0.0f;  // softmax: the largest valid logit, 0 if none
  float exp_sum = 0.0f;  // softmax: sum of exp(x - row_max) over the valid logits
  if constexpr (kHasBias) {
    uint32_t logit_key[VPL];
#pragma unroll
    for (int j = 0; j < VPL; ++j) logit_key[j] = score_key(x[j]);
    float exp_shifted[VPL];
    if constexpr (!kSigmoid) {
      uint32_t lane_max = kTakenKey;
#pragma unroll
      for (int j = 0; j < VPL; ++j) lane_max = max(lane_max, logit_key[j]);  // padding is NaN: kInvalidKey
      const uint32_t max_key = __reduce_max_sync(kFullMask, lane_max);
      if (max_key > kInvalidKey) row_max = key_to_float(max_key);
      exp_sum = softmax_exp_sum<VPL>(x, row_max, exp_shifted);
    }
    const float inv_exp_sum = __frcp_rn(fmaxf(exp_sum, FLT_MIN));
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      uint32_t key = logit_key[j];
      if (key > kInvalidKey) {
        float prob;
        if constexpr (kSigmoid) {
          prob = __frcp_rn(1.0f + exp_flush_subnormal(-x[j]));
        } else {
          prob = exp_shifted[j] * inv_exp_sum;
        }
        const float bias = clamp_infinity(load_bias(p.bias, p.bias_format, first + j));
        key = score_key(clamp_infinity(prob + bias));
      }
      list[j] = make_entry<Entry>(key, first + j);
    }
  } else {
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const uint32_t key = kHalfKeys ? half_key<F>(raw[j]) : score_key(x[j]);
      list[j] = make_entry<Entry>(key, first + j);
    }
  }
  sort_descending<VPL>(list);

  // k rounds: the best head of the warp is the next expert; its lane drops it.
  const unsigned lower_lanes = (1u << lane) - 1;
  Entry selected = 0;             // lane r < k: the entry chosen in round r
  uint32_t max_key = kTakenKey;   // the key chosen in round 0
  for (int round = 0; round < p.k; ++round) {
    bool is_winner;
    Entry top;
    if constexpr (kHalfKeys) {
      top = __reduce_max_sync(kFullMask, list[0]);
      is_winner = list[0] == top;
    } else {
      const uint32_t head_key = entry_key(list[0]);
      const uint32_t top_key = __reduce_max_sync(kFullMask, head_key);
      const unsigned holders = __ballot_sync(kFullMask, head_key == top_key);
      is_winner = head_key == top_key && (holders & lower_lanes) == 0;
      // Off the critical path of the next round: the winner's index bits.
      const uint32_t winner_index = __shfl_sync(kFullMask, static_cast<uint32_t>(list[0]), __ffs(holders) - 1);
      top = (static_cast<Entry>(top_key) << kKeyShift<Entry>) | winner_index;
    }
    if (lane == round) selected = top;
    if (round == 0) max_key = entry_key(top);
#pragma unroll
    for (int j = 0; j + 1 < VPL; ++j) list[j] = is_winner ? list[j + 1] : list[j];
    list[VPL - 1] = is_winner ? Entry(0) : list[VPL - 1];
  }
  const uint32_t selected_key = entry_key(selected);  // kTakenKey in lanes >= k
  const int selected_id = entry_expert(selected);

  // Without a bias the keys decode to the clamped logits: round 0 gave the softmax max. With
  // a bias, reload the logit (an L1 hit).
  float selected_logit = __uint_as_float(0x7fffffffu);  // NaN: invalid
  if constexpr (kHasBias) {
    if (lane < p.k) selected_logit = clamp_infinity(logit_to_float<F>(row_logits[selected_id]));
  } else {
    const float decoded = key_to_logit<F, kHalfKeys>(selected_key);  // branch-free, kept if valid
    if (selected_key > kInvalidKey) selected_logit = decoded;
    if constexpr (!kSigmoid) {
      if (max_key > kInvalidKey) row_max = key_to_logit<F, kHalfKeys>(max_key);
      // Renormalized softmax weights are exp(x - max) / their sum: exp_sum cancels.
      if (!p.renormalize) {
        float exp_shifted[VPL];
        exp_sum = softmax_exp_sum<VPL>(x, row_max, exp_shifted);
      }
    }
  }

  // Weights: lane r < k computes p of its expert (without a bias, softmax and renormalized:
  // exp(x - max) only, which the renormalization turns into p / sum of the chosen p).
  float weight = 0.0f;
  if (lane < p.k && !is_nan(selected_logit)) {
    if constexpr (kSigmoid) {
      weight = div_keep_subnormal(1.0f, add_keep_subnormal(1.0f, exp_accurate(-selected_logit)));
    } else {
      const float shifted = exp_accurate(selected_logit - row_max);
      weight = !kHasBias && p.renormalize ? shifted : div_keep_subnormal(shifted, exp_sum);
    }
  }
  if (p.renormalize) {
    const float total = warp_sum_keep_subnormal(weight, p.k_lanes);  // lanes >= k hold 0
    // As the reference: divide by the total when it is > 0, even a subnormal one (a bit
    // test: fast-math comparisons flush a subnormal total to 0), else every weight is 1/k.
    weight = __float_as_int(total) > 0 ? div_keep_subnormal(weight, total) : p.uniform_weight;
  }
  if (lane < p.k) {
    p.weights[row * p.k + lane] = weight;
    p.ids[row * p.k + lane] = selected_id;
  }
}

// --------------------------------------------------------------------------------- dispatch

template <LogitFormat F, int VPL, bool kSigmoid, bool kHasBias>
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
  C10_CUDA_CHECK(cudaLaunchKernelEx(&config, topk_routing_kernel<F, VPL, kSigmoid, kHasBias>, params));
}

template <LogitFormat F, int VPL>
void launch_for_scoring(const RoutingParams& params, bool sigmoid, cudaStream_t stream) {
  const bool has_bias = params.bias != nullptr;
  if (sigmoid) {
    has_bias ? launch_kernel<F, VPL, true, true>(params, stream) : launch_kernel<F, VPL, true, false>(params, stream);
  } else {
    has_bias ? launch_kernel<F, VPL, false, true>(params, stream) : launch_kernel<F, VPL, false, false>(params, stream);
  }
}

// Experts per lane, rounded up to a compiled bucket.
int experts_per_lane(int num_experts) {
  const int needed = (num_experts + kWarpSize - 1) / kWarpSize;
  for (const int bucket : {1, 2, 4, 6, 8, 12}) {
    if (needed <= bucket) return bucket;
  }
  return 16;  // E <= kMaxExperts
}

template <LogitFormat F>
void launch_for_format(RoutingParams& params, const at::Tensor& logits, bool sigmoid, cudaStream_t stream) {
  const int vpl = experts_per_lane(params.num_experts);
  const int element_size = static_cast<int>(logits.element_size());
  const int width = std::min(16 / element_size, vpl & -vpl);  // as vector_width<F, VPL>()
  params.vector_loads = width > 1 && params.num_experts % width == 0 && params.row_stride % width == 0 &&
                        reinterpret_cast<uintptr_t>(params.logits) % (width * element_size) == 0;
  switch (vpl) {
    case 1: return launch_for_scoring<F, 1>(params, sigmoid, stream);
    case 2: return launch_for_scoring<F, 2>(params, sigmoid, stream);
    case 4: return launch_for_scoring<F, 4>(params, sigmoid, stream);
    case 6: return launch_for_scoring<F, 6>(params, sigmoid, stream);
    case 8: return launch_for_scoring<F, 8>(params, sigmoid, stream);
    case 12: return launch_for_scoring<F, 12>(params, sigmoid, stream);
    default: return launch_for_scoring<F, 16>(params, sigmoid, stream);
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
at::Tensor kept_experts(const at::Tensor& score, const at::Tensor& valid, int64_t n_group, int64_t topk_group,
                        bool group_max) {
  const int64_t num_rows = score.size(0);
  const int64_t group_size = score.size(1) / n_group;
  const at::Tensor grouped = score.masked_fill(at::logical_not(valid), -FLT_MAX).view({num_rows, n_group, group_size});
  at::Tensor group_scores;
  if (group_max || group_size == 1) {
    group_scores = grouped.amax({-1});
  } else {
    const at::Tensor top2 = std::get<0>(grouped.topk(2, -1));
    group_scores = top2.select(-1, 0) + top2.select(-1, 1);
  }
  const at::Tensor kept_groups =
      std::get<1>(group_scores.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/true)).narrow(1, 0, topk_group);
  const at::Tensor kept = at::zeros({num_rows, n_group}, score.options().dtype(at::kBool)).scatter_(1, kept_groups, true);
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
  if (!sigmoid) {
    const at::Tensor masked = x.masked_fill(at::logical_not(valid), -INFINITY);
    const at::Tensor row_max =
        masked.amax({-1}, /*keepdim=*/true).masked_fill(at::logical_not(valid.any(-1, /*keepdim=*/true)), 0.0);
    const at::Tensor unnormalized = at::exp(masked - row_max);
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
    const at::Tensor dropped =
        at::logical_not(kept_experts(score, valid, n_group, topk_group, group_max).gather(1, order)).to(at::kByte);
    order = order.gather(1, std::get<1>(dropped.sort(/*stable=*/true, /*dim=*/-1, /*descending=*/false)));
  }
  const at::Tensor ids = order.narrow(1, 0, k).contiguous();
  at::Tensor weights = prob.gather(1, ids);
  if (renormalize) {
    const at::Tensor total = weights.sum({-1}, /*keepdim=*/true);
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
  const at::ScalarType bias_type = correction_bias.has_value() ? correction_bias->scalar_type() : at::kFloat;
  const bool bias_in_scope =
      bias_type == at::kFloat || bias_type == at::kBFloat16 || bias_type == at::kHalf || bias_type == at::kDouble;
  if (!logits_in_scope || !bias_in_scope || num_experts > kMaxExperts || k > kMaxK || n_group > 1) {
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
  params.num_experts = static_cast<int>(num_experts);
  params.k = static_cast<int>(k);
  params.k_lanes = 1;
  while (params.k_lanes < k) params.k_lanes *= 2;
  if (correction_bias.has_value()) {
    bias = correction_bias->contiguous();
    params.bias = bias.data_ptr();
    switch (bias.scalar_type()) {
      case at::kFloat: params.bias_format = BiasFormat::kFloat32; break;
      case at::kBFloat16: params.bias_format = BiasFormat::kBFloat16; break;
      case at::kHalf: params.bias_format = BiasFormat::kFloat16; break;
      default: params.bias_format = BiasFormat::kFloat64; break;
    }
  }
  params.renormalize = renormalize;
  params.uniform_weight = static_cast<float>(1.0 / static_cast<double>(k));
  params.weights = weights.data_ptr<float>();
  params.ids = ids.data_ptr<int64_t>();

  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  switch (type) {
    case at::kFloat: launch_for_format<LogitFormat::kFloat32>(params, rows, sigmoid, stream); break;
    case at::kBFloat16: launch_for_format<LogitFormat::kBFloat16>(params, rows, sigmoid, stream); break;
    default: launch_for_format<LogitFormat::kFloat16>(params, rows, sigmoid, stream); break;
  }
  return {weights, ids};
}

}  // namespace

TORCH_LIBRARY_IMPL(fusion_passes, CUDA, m) {
  m.impl("topk_routing", &topk_routing_cuda);
}
