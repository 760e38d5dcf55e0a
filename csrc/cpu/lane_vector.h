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

// exp on whole lanes, with no per-lane branch: exp(x) = 2^n exp(r), n = round(x / ln 2),
// |r| <= ln(2) / 2, with the degree-7 Taylor polynomial of exp(r) (truncation error < 2^-27,
// below float rounding). x is first clipped to [-104, 89], beyond which expf is 0 or inf
// (NaN passes through and stays NaN); 2^n is applied as two normal powers of two,
// 2^(n >> 1) * 2^(n - (n >> 1)), so that results that overflow to inf or are subnormal come
// out right (the first product is exact, the second rounds once).
template <typename V>
LO_HD V exp_lanes_impl(V x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(V))));
  const V xc = clip(x, -104.0f, 89.0f);
  const V shifter = splat<V>(12582912.0f);  // 1.5 * 2^23: rounds to integer
  const V n = (xc * 1.44269504088896341f + shifter) - shifter;
  const V r = (xc - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln 2 = hi + lo
  V poly = splat<V>(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const VI ni = __builtin_convertvector(n, VI);  // in [-150, 128] (garbage for NaN lanes,
  const VI n1 = ni >> 1;                         // whose poly is NaN)
  const VI n2 = ni - n1;
  return (poly * (V)((n1 + 127) << 23)) * (V)((n2 + 127) << 23);
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

// relu as one max instruction. MAXPS(a, b) is a > b ? a : b, so MAXPS(0, x) returns x when x
// is NaN or -0.0: bit for bit the generic x < 0 ? 0 : x, which GCC compiles to a compare and a
// blend. Inline assembly rather than intrinsics, because the intrinsics would need the
// instruction set on every always-inline caller in between, not only on the ISA clone that
// finally inlines them. AT&T order: "vmaxps src2, src1, dst" is dst = MAXPS(src1, src2).
#if defined(__x86_64__) && defined(__GNUC__)
template <>
LO_HD Vec4 relu<Vec4>(Vec4 x) {
  Vec4 out{};
  asm("maxps %1, %0" : "+x"(out) : "x"(x));  // out = MAXPS(out = 0, x)
  return out;
}
template <>
LO_HD Vec8 relu<Vec8>(Vec8 x) {
  Vec8 out;
  asm("vmaxps %1, %2, %0" : "=x"(out) : "x"(x), "x"(Vec8{}));
  return out;
}
template <>
LO_HD Vec16 relu<Vec16>(Vec16 x) {
  Vec16 out;
  asm("vmaxps %1, %2, %0" : "=v"(out) : "v"(x), "v"(Vec16{}));
  return out;
}
#endif

// splat as one broadcast instruction (from a register or straight from memory), for the same
// reason: GCC 12 compiles a broadcast of a loaded scalar, whatever its spelling, into one
// masked insert per lane in some loops.
#if defined(__x86_64__) && defined(__GNUC__)
template <>
struct Splat<Vec4> {
  static LO_HD Vec4 of(float x) {
    Vec4 out;
    asm("shufps $0, %0, %0" : "=x"(out) : "0"(x));
    return out;
  }
};
template <>
struct Splat<Vec8> {
  static LO_HD Vec8 of(float x) {
    Vec8 out;
    asm("vbroadcastss %1, %0" : "=x"(out) : "xm"(x));
    return out;
  }
};
template <>
struct Splat<Vec16> {
  static LO_HD Vec16 of(float x) {
    Vec16 out;
    asm("vbroadcastss %1, %0" : "=v"(out) : "vm"(x));
    return out;
  }
};
#endif

// N tiles side by side: the MLP runs on groups so that every weight it broadcasts feeds N
// vector FMAs (one broadcast load per N FMAs instead of one per FMA).
template <typename V, int N>
struct LaneGroup {
  V t[N];
};
template <typename V, int N>
struct Splat<LaneGroup<V, N>> {
  static LO_HD LaneGroup<V, N> of(float x) {
    LaneGroup<V, N> out;
    for (int i = 0; i < N; ++i) out.t[i] = splat<V>(x);
    return out;
  }
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
