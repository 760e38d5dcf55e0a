// The CPU kernels' SIMD types: GCC vectors of floats operated on lane-wise, one per instruction
// set, each as wide as that set's registers (a wider vector would be lowered through memory):
// Vec16 (AVX-512), Vec8 (AVX2 + FMA), Vec4 (baseline x86-64 / any other machine). The shared
// per-element maths of ../lopt_math.h is instantiated with them.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../lopt_math.h"

namespace lo_ops {

typedef float Vec4 __attribute__((vector_size(16)));
typedef float Vec8 __attribute__((vector_size(32)));
typedef float Vec16 __attribute__((vector_size(64)));

template <typename V>
constexpr int kLanesOf = static_cast<int>(sizeof(V) / sizeof(float));
constexpr int kMaxLanes = 16;

// exp on whole lanes: exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, with the
// degree-7 Taylor polynomial of exp(r) (truncation error < 2^-27, below float rounding).
// Lanes outside |x| < 87 (overflow, subnormal results, NaN) take expf.
template <typename V>
LO_HD V exp_lanes_impl(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V shifter = splat<V>(12582912.0f);  // 1.5 * 2^23: rounds to integer
  const V n = (x * 1.44269504088896341f + shifter) - shifter;
  const V r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 = hi + lo
  V poly = splat<V>(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  V out = poly * (V)bits;
  for (int l = 0; l < kLanesOf<V>; ++l)
    if (!(std::fabs(x[l]) < 87.0f)) out[l] = expf(x[l]);
  return out;
}

template <>
LO_HD Vec4 exp_lanes<Vec4>(Vec4 x) {
  return exp_lanes_impl(x);
}
template <>
LO_HD Vec8 exp_lanes<Vec8>(Vec8 x) {
  return exp_lanes_impl(x);
}
template <>
LO_HD Vec16 exp_lanes<Vec16>(Vec16 x) {
  return exp_lanes_impl(x);
}

// N tiles side by side: the MLP runs on groups so that every weight it broadcasts feeds N
// vector FMAs (one broadcast load per N FMAs instead of one per FMA).
template <typename V, int N>
struct LaneGroup {
  V t[N];
};
template <typename V, int N>
LO_HD LaneGroup<V, N> operator+(const LaneGroup<V, N>& x, float s) {
  LaneGroup<V, N> out;
  for (int i = 0; i < N; ++i) out.t[i] = x.t[i] + s;
  return out;
}
template <typename V, int N>
LO_HD LaneGroup<V, N> operator+(const LaneGroup<V, N>& x, const LaneGroup<V, N>& y) {
  LaneGroup<V, N> out;
  for (int i = 0; i < N; ++i) out.t[i] = x.t[i] + y.t[i];
  return out;
}
template <typename V, int N>
LO_HD LaneGroup<V, N> operator*(float s, const LaneGroup<V, N>& x) {
  LaneGroup<V, N> out;
  for (int i = 0; i < N; ++i) out.t[i] = s * x.t[i];
  return out;
}
template <typename V, int N>
LO_HD LaneGroup<V, N>& operator+=(LaneGroup<V, N>& x, const LaneGroup<V, N>& y) {
  for (int i = 0; i < N; ++i) x.t[i] += y.t[i];
  return x;
}
template <typename V, int N>
LO_HD LaneGroup<V, N> relu(const LaneGroup<V, N>& x) {
  LaneGroup<V, N> out;
  for (int i = 0; i < N; ++i) out.t[i] = lo_ops::relu(x.t[i]);
  return out;
}

// Output units per block x tiles per group <= 24 vector accumulators.
template <typename V, int N>
constexpr int kDenseBlock<LaneGroup<V, N>> = N >= 3 ? 8 : 4;

// Per instruction set: the vector type and how many tiles the MLP takes at once (AVX-512 has
// 32 vector registers, AVX2 and SSE 16).
struct IsaAvx512 {
  using V = Vec16;
  static constexpr int kTiles = 3;
};
struct IsaAvx2 {
  using V = Vec8;
  static constexpr int kTiles = 2;
};
struct IsaBase {
  using V = Vec4;
  static constexpr int kTiles = 2;
};

// The first `count` lanes from src (the rest zero).
template <typename V>
LO_HD V load_lanes(const float* src, int count) {
  V out{};
  if (count == kLanesOf<V>) {
    std::memcpy(&out, src, sizeof(out));
  } else {
    for (int l = 0; l < count; ++l) out[l] = src[l];
  }
  return out;
}

template <typename V, typename scalar_t>
LO_HD V load_lanes(const scalar_t* src, int count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return load_lanes<V>(reinterpret_cast<const float*>(src), count);
  } else {
    V out{};
    for (int l = 0; l < count; ++l) out[l] = static_cast<float>(src[l]);
    return out;
  }
}

// The first `count` lanes of v into dst (converted to dst's type).
template <typename V, typename scalar_t>
LO_HD void store_lanes(scalar_t* dst, const V& v, int count) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    if (count == kLanesOf<V>) {
      std::memcpy(dst, &v, sizeof(v));
      return;
    }
  }
  for (int l = 0; l < count; ++l) dst[l] = static_cast<scalar_t>(v[l]);
}

}  // namespace lo_ops
