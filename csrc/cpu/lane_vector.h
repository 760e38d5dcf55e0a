// The CPU kernels' SIMD type: kLanes floats operated on lane-wise (GCC vector extension),
// lowered to the widest vectors of each per-ISA clone of the hot loops. The shared
// per-element maths of ../small_fc_lopt_math.h is instantiated with it.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include "../small_fc_lopt_math.h"

namespace lo_ops {

constexpr int kLanes = 16;  // elements per tile
typedef float LaneVector __attribute__((vector_size(kLanes * sizeof(float))));
typedef double LaneVectorD __attribute__((vector_size(kLanes * sizeof(double))));

namespace small_fc_lopt {
// exp on whole lanes: exp(x) = 2^n exp(r), n = round(x / ln 2), |r| <= ln(2) / 2, with the
// degree-7 Taylor polynomial of exp(r) (truncation error < 2^-27, below float rounding).
// Lanes outside |x| < 87 (overflow, subnormal results, NaN) take expf.
template <>
LO_HD LaneVector exp_lanes<LaneVector>(LaneVector x) {
  typedef int32_t VI __attribute__((vector_size(sizeof(LaneVector))));
  const LaneVector shifter = splat<LaneVector>(12582912.0f);  // 1.5 * 2^23: rounds to integer
  const LaneVector n = (x * 1.44269504088896341f + shifter) - shifter;
  const LaneVector r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;  // ln2 hi+lo
  LaneVector poly = splat<LaneVector>(1.0f / 5040.0f);
  poly = poly * r + 1.0f / 720.0f;
  poly = poly * r + 1.0f / 120.0f;
  poly = poly * r + 1.0f / 24.0f;
  poly = poly * r + 1.0f / 6.0f;
  poly = poly * r + 0.5f;
  poly = poly * r + 1.0f;
  poly = poly * r + 1.0f;
  const VI bits = (__builtin_convertvector(n, VI) + 127) << 23;
  LaneVector scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  LaneVector out = poly * scale;
  for (int l = 0; l < kLanes; ++l)
    if (!(std::fabs(x[l]) < 87.0f)) out[l] = expf(x[l]);
  return out;
}
}  // namespace small_fc_lopt

// kTiles tiles side by side: the MLP runs on groups so that every weight it broadcasts feeds
// kTiles vector FMAs (one broadcast load per kTiles FMAs instead of one per FMA).
constexpr int kTiles = 3;
struct LaneGroup {
  LaneVector t[kTiles];
};
LO_HD LaneGroup operator+(const LaneGroup& x, float s) {
  LaneGroup out;
  for (int i = 0; i < kTiles; ++i) out.t[i] = x.t[i] + s;
  return out;
}
LO_HD LaneGroup operator+(const LaneGroup& x, const LaneGroup& y) {
  LaneGroup out;
  for (int i = 0; i < kTiles; ++i) out.t[i] = x.t[i] + y.t[i];
  return out;
}
LO_HD LaneGroup operator*(float s, const LaneGroup& x) {
  LaneGroup out;
  for (int i = 0; i < kTiles; ++i) out.t[i] = s * x.t[i];
  return out;
}
LO_HD LaneGroup& operator+=(LaneGroup& x, const LaneGroup& y) {
  for (int i = 0; i < kTiles; ++i) x.t[i] += y.t[i];
  return x;
}
LO_HD LaneGroup relu(const LaneGroup& x) {
  LaneGroup out;
  for (int i = 0; i < kTiles; ++i) out.t[i] = small_fc_lopt::relu(x.t[i]);
  return out;
}

namespace small_fc_lopt {
// 8 output units x 3 tiles: 24 vector accumulators, 3 tile loads and 8 broadcasts per 24 FMAs.
template <>
constexpr int kDenseBlock<LaneGroup> = 8;
}  // namespace small_fc_lopt

// The first `count` lanes from src (the rest zero).
LO_HD LaneVector load_lanes(const float* src, int count) {
  LaneVector out{};
  if (count == kLanes) {
    std::memcpy(&out, src, sizeof(out));
  } else {
    for (int l = 0; l < count; ++l) out[l] = src[l];
  }
  return out;
}

template <typename scalar_t>
LO_HD LaneVector load_lanes(const scalar_t* src, int count) {
  LaneVector out{};
  for (int l = 0; l < count; ++l) out[l] = static_cast<float>(src[l]);
  return out;
}

// The first `count` lanes of v into dst.
LO_HD void store_lanes(float* dst, const LaneVector& v, int count) {
  if (count == kLanes) {
    std::memcpy(dst, &v, sizeof(v));
  } else {
    for (int l = 0; l < count; ++l) dst[l] = v[l];
  }
}

}  // namespace lo_ops
