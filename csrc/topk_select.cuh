// The per-row top-k selection of fusion_passes::topk_routing, as device code: one warp routes
// one row. Included by csrc/topk_routing.cu (a warp per row of logits in global memory) and by
// the fused router + routing kernel (a warp per row that its GEMM left in shared memory), so
// both kernels run this one source of the selection; the semantics are those of
// `topk_routing_reference` in fusion_passes/ops.py, the design is described in
// csrc/topk_routing.cu and docs/notes/topk_routing.md.
//
// route_row() takes a plain (generic) pointer to the row, so it reads global or shared memory
// alike; the bias is read from global memory through the read-only cache. It neither waits
// for prior grids nor releases dependents: the PDL calls are the kernel's (the helpers are
// here for both kernels).
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/core/ScalarType.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cfloat>
#include <cstdint>
#include <optional>
#include <string>
#include <type_traits>
#include <utility>

namespace fusion_passes::topk_select {

constexpr int kWarpSize = 32;
constexpr int kMaxExperts = 16 * kWarpSize;  // 512
constexpr int kMaxK = kWarpSize;
constexpr int kMaxGroups = kWarpSize;
constexpr unsigned kFullMask = 0xffffffffu;

constexpr uint32_t kTakenKey = 0;
constexpr uint32_t kInvalidKey = 1;
constexpr uint32_t kIndexMask = kMaxExperts - 1;  // the entry bits of 511 - e

enum class LogitFormat { kFloat32, kBFloat16, kFloat16 };
enum class BiasFormat : int { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2, kFloat64 = 3 };

// What a warp needs to route one row, besides the row itself.
struct RowSelection {
  int num_experts;
  int k;
  const void* bias;  // [E] contiguous global memory, or nullptr
  BiasFormat bias_format;
  bool renormalize;
  bool vector_loads;     // the row start is aligned for vector_width<F, VPL>() and E is a multiple of it
  float uniform_weight;  // 1/k rounded from double, the weight of a row whose weights sum to 0
  // Group-limited selection (used by route_row<..., kGrouped = true>): n_group groups of
  // group_size experts. lanes_per_group > 0 when a group is that many whole lanes (a power of
  // two: the butterfly path), 0 for any other shape (the scanning path).
  int n_group;
  int group_size;
  int topk_group;
  int lanes_per_group;
  bool group_max;  // group score: the best selection score, else the sum of the best two
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
__device__ __forceinline__ float sub_keep_subnormal(float a, float b) {
  float d;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
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

// exp(t) within about 2 ulp, for the softmax sum and the softmax selection scores of a
// correction bias (not for the weights): 2^h by ex2.approx with h = t*log2(e) rounded, times 1 + d*ln2 for the
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

// libdevice's expf, which ATen's CUDA sigmoid reaches through std::exp (ATen is compiled without
// fast math); called by name because --use_fast_math turns expf into __expf.
extern "C" __device__ float __nv_expf(float);

// sigmoid(x) bitwise as torch.sigmoid computes it on CUDA for fp32: 1 / (1 + expf(-x)) with IEEE
// add and division. --use_fast_math also sets -ftz, which compiles __nv_expf into the same
// instruction sequence with .ftz added (checked in the PTX of nvcc 13.0): that changes a result
// only where an operand or the result is subnormal. A subnormal x gives expf(-x) = 1 either way
// (the ex2.approx step is .ftz in both), and a subnormal expf(-x), flushed to 0 or not, gives
// 1 + it = 1; add.rn and div.rn below keep subnormals like ATen. So the flush never shows.
//
// div.rn compiles to a range check and a branch to a slow subroutine, which keeps the compiler
// from interleaving the sigmoids of a lane's experts (one serial chain each). For a sigmoid's
// denominator d = 1 + expf(-x) in [1, 2^126) the quotient 1/d is normal and div.rn takes its
// fast path: reciprocal estimate, one Newton step, one FMA remainder correction, correctly
// rounded. reciprocal_of_denominator is that path without the branch; d >= 2^126 (x < -87.3:
// a subnormal or zero result) goes to div.rn. A GPU test checks every fp32 x against
// torch.sigmoid.
constexpr float kFastReciprocalLimit = 0x1p126f;

__device__ __forceinline__ float sigmoid_denominator(float x) { return add_keep_subnormal(1.0f, __nv_expf(-x)); }

__device__ __forceinline__ float reciprocal_of_denominator(float d) {
  float estimate, error, refined, remainder, quotient;
  asm("rcp.approx.ftz.f32 %0, %1;" : "=f"(estimate) : "f"(d));
  asm("fma.rn.f32 %0, %1, %2, 0f3F800000;" : "=f"(error) : "f"(-d), "f"(estimate));
  asm("fma.rn.f32 %0, %1, %2, %1;" : "=f"(refined) : "f"(estimate), "f"(error));
  asm("fma.rn.f32 %0, %1, %2, 0f3F800000;" : "=f"(remainder) : "f"(-d), "f"(refined));
  asm("fma.rn.f32 %0, %1, %2, %2;" : "=f"(quotient) : "f"(remainder), "f"(refined));
  return quotient;
}

// N sigmoids: the common range as N independent branch-free chains, the rare rest
// (d >= 2^126) fixed up after them. NaN x gives NaN.
template <int N>
__device__ __forceinline__ void sigmoids_like_torch(const float (&x)[N], float (&p)[N]) {
  float d[N];
  bool any_outside = false;
#pragma unroll
  for (int j = 0; j < N; ++j) {
    d[j] = sigmoid_denominator(x[j]);
    p[j] = reciprocal_of_denominator(d[j]);
    any_outside |= d[j] >= kFastReciprocalLimit;
  }
  if (any_outside) {
#pragma unroll
    for (int j = 0; j < N; ++j) {
      if (d[j] >= kFastReciprocalLimit) p[j] = div_keep_subnormal(1.0f, d[j]);
    }
  }
}

__device__ __forceinline__ float sigmoid_like_torch(float x) {
  const float in[1] = {x};
  float out[1];
  sigmoids_like_torch<1>(in, out);
  return out[0];
}

// Below this t = x - max, a softmax group term counts as 0 (_SOFTMAX_GROUP_TERM_FLOOR in
// fusion_passes/ops.py).
constexpr float kSoftmaxGroupTermFloor = -87.0f;

// The group term of a valid logit x for softmax top2_sum without a bias (step 4 of the
// reference): u = exp(x - row_max) bitwise as torch computes it on CUDA, the IEEE subtraction
// then libdevice's expf (as ATen's exp kernel, compiled without fast math), and 0 below the
// floor. For t in [-87, 0] -ftz cannot change __nv_expf: the result is normal (>= 1.6e-38),
// and an intermediate is subnormal only for a t so small that exp(t) = 1 both ways (the
// ex2.approx step is .ftz in both); below -87 the flush would show, hence the floor.
__device__ __forceinline__ float softmax_group_term(float x, float row_max) {
  const float t = sub_keep_subnormal(x, row_max);
  return t < kSoftmaxGroupTermFloor ? 0.0f : __nv_expf(t);  // t = -Inf (overflow) gives 0
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

// The bias values of the lane's experts [first, first + VPL) (0 past E): one switch on the
// format around VPL independent loads, so they are all in flight together.
template <int VPL>
__device__ __forceinline__ void load_biases(const void* bias, BiasFormat format, int first, int num_experts,
                                            float (&out)[VPL]) {
  const auto load_all = [&](auto load_one) {
#pragma unroll
    for (int j = 0; j < VPL; ++j) out[j] = first + j < num_experts ? load_one(first + j) : 0.0f;
  };
  switch (format) {
    case BiasFormat::kFloat32:
      return load_all([&](int e) { return load_bias(bias, BiasFormat::kFloat32, e); });
    case BiasFormat::kBFloat16:
      return load_all([&](int e) { return load_bias(bias, BiasFormat::kBFloat16, e); });
    case BiasFormat::kFloat16:
      return load_all([&](int e) { return load_bias(bias, BiasFormat::kFloat16, e); });
    default:
      return load_all([&](int e) { return load_bias(bias, BiasFormat::kFloat64, e); });
  }
}

// ------------------------------------------------------------------------------ warp helpers

// Sum over all lanes, result in each.
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
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


// ---------------------------------------------------------------------------- launch shapes

// Host side. The BiasFormat of a correction bias of dtype t (fp32, bf16, fp16, else fp64:
// routing_in_scope has checked that it is one of the four).
inline BiasFormat bias_format_of(c10::ScalarType t) {
  switch (t) {
    case c10::ScalarType::Float: return BiasFormat::kFloat32;
    case c10::ScalarType::BFloat16: return BiasFormat::kBFloat16;
    case c10::ScalarType::Half: return BiasFormat::kFloat16;
    default: return BiasFormat::kFloat64;
  }
}

// Host side. Whether route_row routes rows of num_experts logits with these arguments: ones the
// op accepts (see check_topk_routing_args in fusion_passes/ops.py; the fused kernel's caller has
// not checked them) within the kernel's scope: k <= 32, E <= 512, n_group <= 32, a correction
// bias in fp32/bf16/fp16/fp64. The logits' own dtype and layout are the caller's to check.
inline bool routing_in_scope(int64_t num_experts, int64_t k, const std::string& scoring,
                             const std::optional<at::Tensor>& correction_bias, int64_t n_group, int64_t topk_group,
                             const std::string& group_score, const c10::Device& device) {
  if (!(1 <= k && k <= num_experts && k <= kMaxK && num_experts <= kMaxExperts)) return false;
  if (scoring != "softmax" && scoring != "sigmoid") return false;
  if (group_score != "top2_sum" && group_score != "max") return false;
  if (correction_bias.has_value()) {
    const c10::ScalarType t = correction_bias->scalar_type();
    const bool format = t == c10::ScalarType::Float || t == c10::ScalarType::BFloat16 || t == c10::ScalarType::Half ||
                        t == c10::ScalarType::Double;
    if (!(format && correction_bias->dim() == 1 && correction_bias->size(0) == num_experts &&
          correction_bias->device() == device)) {
      return false;
    }
  }
  return n_group >= 1 && n_group <= kMaxGroups && num_experts % n_group == 0 && 1 <= topk_group &&
         topk_group <= n_group && k <= topk_group * (num_experts / n_group);
}

// Host side. Experts per lane (route_row's VPL), rounded up to a compiled bucket.
inline int experts_per_lane(int num_experts) {
  const int needed = (num_experts + kWarpSize - 1) / kWarpSize;
  for (const int bucket : {1, 2, 4, 6, 8, 12}) {
    if (needed <= bucket) return bucket;
  }
  return 16;  // E <= kMaxExperts
}

// Lanes per group for route_row's butterfly group path: a group of whole lanes, a power of two
// of them; 0 for any other shape, which route_row's scanning path handles.
inline int lanes_per_group(int num_experts, int n_group) {
  const int group_size = num_experts / n_group;
  const int vpl = experts_per_lane(num_experts);
  if (group_size % vpl != 0) return 0;
  const int lanes = group_size / vpl;
  return (lanes & (lanes - 1)) == 0 ? lanes : 0;
}

// ------------------------------------------------------------------------------------ groups

// The fp32 score of a group from its best two selection keys: the sum of their group terms
// (`term_of` a valid key; an invalid key counts -FLT_MAX), added without flushing as the
// reference adds them; then its key. Group scores are never NaN, so score_key orders them,
// +-Inf included, all above kTakenKey.
template <typename TermOfKey>
__device__ __forceinline__ uint32_t group_key_of(uint32_t best, uint32_t second, bool best_only, TermOfKey term_of) {
  const auto score_of = [&](uint32_t key) { return key > kInvalidKey ? term_of(key) : -FLT_MAX; };
  return score_key(best_only ? score_of(best) : add_keep_subnormal(score_of(best), score_of(second)));
}

// Whether group `group` (whose key this lane holds) is among the topk_group best: its rank is the
// number of groups with a better key, or an equal key and a lower index. Every lane gathers the
// n_group keys from lanes 0, stride, 2*stride, ... (independent shuffles, one pass) instead of
// topk_group dependent rounds of a warp maximum.
__device__ __forceinline__ bool group_is_kept(uint32_t group_key, int group, int stride, const RowSelection& s) {
  int better = 0;
#pragma unroll 8
  for (int h = 0; h < s.n_group; ++h) {
    const uint32_t other = __shfl_sync(kFullMask, group_key, h * stride);
    better += other > group_key || (other == group_key && h < group);
  }
  return group < s.n_group && better < s.topk_group;
}

// ------------------------------------------------------------------------------------ one row

// Routes one row: called by all 32 lanes of a warp (converged), `row` pointing at its E logits
// in global or shared memory (read-only, and readable by every lane: the scanning group path
// reads other lanes' experts). Lane r < k writes weights[r] and ids[r].
template <LogitFormat F, int VPL, bool kSigmoid, bool kHasBias, bool kGrouped>
__device__ __forceinline__ void route_row(const LogitStorage<F>* row, const RowSelection& s, float* weights,
                                          int64_t* ids) {
  // Without a bias a 16-bit logit is its own exact 16-bit selection key.
  constexpr bool kHalfKeys = F != LogitFormat::kFloat32 && !kHasBias;
  using S = LogitStorage<F>;
  using Entry = std::conditional_t<kHalfKeys, uint32_t, uint64_t>;
  const int lane = threadIdx.x % kWarpSize;
  const int first = lane * VPL;

  // The logits and, in flight with them, the lane's bias values.
  S raw[VPL];
  load_logits<F, VPL>(row, first, s.num_experts, s.vector_loads, raw);
  float bias[VPL];
  if constexpr (kHasBias) {
    load_biases<VPL>(s.bias, s.bias_format, first, s.num_experts, bias);
  }
  float x[VPL];  // clamped logits, NaN in padding slots (only the paths that need them keep them)
#pragma unroll
  for (int j = 0; j < VPL; ++j) x[j] = clamp_infinity(logit_to_float<F>(raw[j]));
  float sigmoid_p[VPL];  // sigmoid with a bias: every expert's p (NaN in padding slots)
  if constexpr (kSigmoid && kHasBias) sigmoids_like_torch<VPL>(x, sigmoid_p);

  // With a correction bias the softmax statistics (max and sum of exp(x - max) over the valid
  // logits) come first.
  float row_max = 0.0f;  // softmax: the largest valid logit, 0 if none
  float exp_sum = 0.0f;  // softmax: sum of exp(x - row_max) over the valid logits
  float exp_shifted[VPL];
  if constexpr (kHasBias && !kSigmoid) {
    uint32_t lane_max = kTakenKey;
#pragma unroll
    for (int j = 0; j < VPL; ++j) lane_max = max(lane_max, score_key(x[j]));  // padding is NaN: kInvalidKey
    const uint32_t max_key = __reduce_max_sync(kFullMask, lane_max);
    if (max_key > kInvalidKey) row_max = key_to_float(max_key);
    exp_sum = softmax_exp_sum<VPL>(x, row_max, exp_shifted);
  }
  const float inv_exp_sum = __frcp_rn(fmaxf(exp_sum, FLT_MIN));
  // p of a valid logit on the bias path: the sigmoid bitwise like torch, or the softmax
  // probability from exp(x - max) (one expression, so a recomputation gives the same bits).
  const auto biased_prob = [&](float logit, float shifted) {
    if constexpr (kSigmoid) {
      return sigmoid_like_torch(logit);
    } else {
      return shifted * inv_exp_sum;
    }
  };
  // The selection key of an expert on the bias path: p + bias in fp32, correctly rounded
  // without flushing (inline PTX: never contracted with p's computation); kInvalidKey for a NaN
  // logit or bias. p is at most 1 up to rounding (or NaN) and the bias is clamped to +-FLT_MAX,
  // so the sum cannot overflow: the reference's clamp of it is a no-op here. Computed for every
  // expert, then selected: with a branch around it, the compiler made each expert's key a
  // serial region (BSSY/BSYNC) of its own.
  const auto biased_key = [](float logit, float prob, float expert_bias) {
    const uint32_t key = score_key(add_keep_subnormal(prob, clamp_infinity(expert_bias)));
    return is_nan(logit) ? kInvalidKey : key;
  };

  // The lane's entries, and what lane r needs of its expert after the rounds: with a bias, p
  // (sigmoid) or the logit (softmax), fetched from the owner lane by shuffles.
  Entry list[VPL];
  float carried[VPL];
  uint32_t lane_max_key = kTakenKey;  // the lane's best key, before groups drop any
#pragma unroll
  for (int j = 0; j < VPL; ++j) {
    uint32_t key;
    if constexpr (kHasBias) {
      const float prob = kSigmoid ? sigmoid_p[j] : biased_prob(x[j], exp_shifted[j]);
      key = biased_key(x[j], prob, bias[j]);
      carried[j] = kSigmoid ? (is_nan(x[j]) ? 0.0f : prob) : x[j];
    } else {
      key = kHalfKeys ? half_key<F>(raw[j]) : score_key(x[j]);
    }
    lane_max_key = max(lane_max_key, key);
    list[j] = make_entry<Entry>(key, first + j);
  }

  // Softmax without a bias needs the row's largest logit for the weights, and with groups
  // before they drop any expert (the best may sit in a dropped group), also for the group terms.
  uint32_t max_key = kTakenKey;
  if constexpr (kGrouped && !kHasBias && !kSigmoid) {
    max_key = __reduce_max_sync(kFullMask, lane_max_key);
    if (max_key > kInvalidKey) row_max = key_to_logit<F, kHalfKeys>(max_key);
  }
  // A valid selection key's group term (step 4 of the reference): the selection score (the
  // logit without a bias), or for top2_sum without a bias the probability that ranks groups.
  const auto group_term = [&](uint32_t key) {
    const float score = key_to_logit<F, kHalfKeys>(key);  // with a bias: key_to_float, p + bias
    if constexpr (kHasBias) {
      return score;
    } else if constexpr (kSigmoid) {
      return s.group_max ? score : sigmoid_like_torch(score);
    } else {
      return s.group_max ? score : softmax_group_term(score, row_max);
    }
  };
  const bool best_only = s.group_max || s.group_size == 1;

  // Groups whose shape is not a power of two of whole lanes: lane g < n_group scores group g by
  // scanning its experts in memory with the expressions above (the same bits as their owners'
  // keys), then each lane drops its experts of unkept groups before sorting.
  if (kGrouped && s.lanes_per_group == 0) {
    uint32_t best = kTakenKey;
    uint32_t second = kTakenKey;
    if (lane < s.n_group) {
      const int begin = lane * s.group_size;
#pragma unroll 4
      for (int e = begin; e < begin + s.group_size; ++e) {
        const S bits = row[e];
        uint32_t key;
        if constexpr (kHasBias) {
          const float logit = clamp_infinity(logit_to_float<F>(bits));
          const float shifted = kSigmoid ? 0.0f : exp_flush_subnormal(logit - row_max);
          key = biased_key(logit, biased_prob(logit, shifted), load_bias(s.bias, s.bias_format, e));
        } else {
          key = kHalfKeys ? half_key<F>(bits) : score_key(clamp_infinity(logit_to_float<F>(bits)));
        }
        second = max(second, min(best, key));
        best = max(best, key);
      }
    }
    const uint32_t group_key = lane < s.n_group ? group_key_of(best, second, best_only, group_term) : kTakenKey;
    const unsigned kept_groups = __ballot_sync(kFullMask, group_is_kept(group_key, lane, 1, s));
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const int group = (first + j) / s.group_size;
      if (group >= s.n_group || !((kept_groups >> group) & 1u)) list[j] = Entry(0);
    }
  }
  sort_descending<VPL>(list);

  if (kGrouped && s.lanes_per_group > 0) {
    // A group is lanes_per_group aligned lanes (a power of two): a butterfly over them merges
    // the lanes' sorted (best, second best) keys, so every lane of a group holds its score;
    // the lanes of unkept groups (and lanes past E) drop all their entries.
    uint32_t best = entry_key(list[0]);
    uint32_t second = VPL > 1 ? entry_key(list[VPL > 1 ? 1 : 0]) : kTakenKey;
    for (int offset = 1; offset < s.lanes_per_group; offset *= 2) {
      const uint32_t other_best = __shfl_xor_sync(kFullMask, best, offset);
      const uint32_t other_second = __shfl_xor_sync(kFullMask, second, offset);
      second = max(min(best, other_best), max(second, other_second));
      best = max(best, other_best);
    }
    const int group = lane >> (__ffs(s.lanes_per_group) - 1);  // a power of two: no division
    const uint32_t group_key = group < s.n_group ? group_key_of(best, second, best_only, group_term) : kTakenKey;
    if (!group_is_kept(group_key, group, s.lanes_per_group, s)) {
#pragma unroll
      for (int j = 0; j < VPL; ++j) list[j] = Entry(0);
    }
  }

  // k rounds: the best head of the warp is the next expert; its lane drops it.
  const unsigned lower_lanes = (1u << lane) - 1;
  Entry selected = 0;  // lane r < k: the entry chosen in round r
  for (int round = 0; round < s.k; ++round) {
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
    if (!kGrouped && round == 0) max_key = entry_key(top);
#pragma unroll
    for (int j = 0; j + 1 < VPL; ++j) list[j] = is_winner ? list[j + 1] : list[j];
    list[VPL - 1] = is_winner ? Entry(0) : list[VPL - 1];
  }
  const uint32_t selected_key = entry_key(selected);  // kTakenKey in lanes >= k
  const int selected_id = entry_expert(selected);     // 511 in lanes >= k

  // Weights: lane r < k computes p of its expert. Without a bias the keys decode to the clamped
  // logits; with one, the owner lane's carried value comes over by VPL independent shuffles
  // (no second memory access). Softmax weights use exp within 1 ulp, and without a bias and
  // renormalized, exp(x - max) only, which the renormalization turns into p / sum of the chosen p.
  float weight = 0.0f;
  float selected_logit = __uint_as_float(0x7fffffffu);  // NaN: invalid
  if constexpr (kHasBias) {
    const int owner = (selected_id / VPL) % kWarpSize;
    const int slot = selected_id % VPL;
    float picked = 0.0f;
#pragma unroll
    for (int j = 0; j < VPL; ++j) {
      const float value = __shfl_sync(kFullMask, carried[j], owner);
      if (slot == j) picked = value;
    }
    if constexpr (kSigmoid) {
      if (lane < s.k) weight = picked;  // 0 for a NaN logit
    } else {
      selected_logit = picked;
    }
  } else {
    const float decoded = key_to_logit<F, kHalfKeys>(selected_key);  // branch-free, kept if valid
    if (selected_key > kInvalidKey) selected_logit = decoded;
    if constexpr (!kSigmoid) {
      if (max_key > kInvalidKey) row_max = key_to_logit<F, kHalfKeys>(max_key);
      // Renormalized softmax weights are exp(x - max) / their sum: exp_sum cancels.
      if (!s.renormalize) exp_sum = softmax_exp_sum<VPL>(x, row_max, exp_shifted);
    }
  }
  if (lane < s.k && !is_nan(selected_logit)) {
    if constexpr (kSigmoid) {
      weight = sigmoid_like_torch(selected_logit);
    } else {
      const float shifted = exp_accurate(selected_logit - row_max);
      weight = !kHasBias && s.renormalize ? shifted : div_keep_subnormal(shifted, exp_sum);
    }
  }
  if (s.renormalize) {
    // The reference's sum: the k weights added left to right in rank order, in fp32.
    float total = 0.0f;
#pragma unroll 4
    for (int r = 0; r < s.k; ++r) total = add_keep_subnormal(total, __shfl_sync(kFullMask, weight, r));
    // As the reference: divide by the total when it is > 0, even a subnormal one (a bit
    // test: fast-math comparisons flush a subnormal total to 0), else every weight is 1/k.
    weight = __float_as_int(total) > 0 ? div_keep_subnormal(weight, total) : s.uniform_weight;
  }
  if (lane < s.k) {
    weights[lane] = weight;
    ids[lane] = selected_id;
  }
}

}  // namespace fusion_passes::topk_select
