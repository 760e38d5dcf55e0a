// Geometry of the factored second moment (spec section 1.1), host-side and shared by the
// CPU and CUDA backends.
//
// A tensor with ndim >= 2 is viewed as 5-D [A, P, B, Q, C], where P is the factored axis with
// the lower index and Q the one with the higher index. d0 (the largest axis, decided like a
// stable ascending argsort) is either P or Q. The row accumulator r drops d0, the column
// accumulator c drops d1, and the per-row mean of r drops both.
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <numeric>
#include <vector>

#include "lopt_math.h"

namespace lo_ops {

struct FactoredGeometry {
  int64_t A = 1, P = 1, B = 1, Q = 1, C = 1;
  int d0 = -1, d1 = -1;
  bool d0_is_p = false;

  LO_HD int64_t numel() const { return A * P * B * Q * C; }
  LO_HD int64_t drop_p_numel() const { return A * B * Q * C; }
  LO_HD int64_t drop_q_numel() const { return A * P * B * C; }
  LO_HD int64_t drop_pq_numel() const { return A * B * C; }
  LO_HD int64_t row_numel() const { return d0_is_p ? drop_p_numel() : drop_q_numel(); }
  LO_HD int64_t col_numel() const { return d0_is_p ? drop_q_numel() : drop_p_numel(); }
};

// (d0, d1) = (argsort(S)[-1], argsort(S)[-2]) with a stable ascending argsort.
inline std::pair<int, int> factored_axes(const std::vector<int64_t>& sizes) {
  std::vector<int> order(sizes.size());
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int a, int b) { return sizes[a] < sizes[b]; });
  const int n = static_cast<int>(order.size());
  return {order[n - 1], order[n - 2]};
}

// The 5-D view of a tensor of shape `sizes` factored along (d0, d1): the axes of its own
// shape, or those of the whole tensor that `sizes` is a shard of.
inline FactoredGeometry factored_geometry(const std::vector<int64_t>& sizes, int d0, int d1) {
  FactoredGeometry geo;
  geo.d0 = d0;
  geo.d1 = d1;
  const int lo = std::min(geo.d0, geo.d1);
  const int hi = std::max(geo.d0, geo.d1);
  geo.d0_is_p = geo.d0 == lo;
  const int nd = static_cast<int>(sizes.size());
  for (int i = 0; i < lo; ++i) geo.A *= sizes[i];
  geo.P = sizes[lo];
  for (int i = lo + 1; i < hi; ++i) geo.B *= sizes[i];
  geo.Q = sizes[hi];
  for (int i = hi + 1; i < nd; ++i) geo.C *= sizes[i];
  return geo;
}

inline FactoredGeometry factored_geometry(const std::vector<int64_t>& sizes) {
  const auto axes = factored_axes(sizes);
  return factored_geometry(sizes, axes.first, axes.second);
}

// The flat index in S without d0 and d1 of element e of r (S without d0): where the sum of r
// over its copy of d1 that element e belongs to is kept.
LO_HD int64_t row_sum_index(const FactoredGeometry& geo, int64_t e) {
  return geo.d0_is_p ? (e / (geo.Q * geo.C)) * geo.C + e % geo.C
                     : (e / (geo.P * geo.B * geo.C)) * (geo.B * geo.C) + e % (geo.B * geo.C);
}

// Shape of the row (drop d0) or column (drop d1) accumulator, without the channel axis.
inline std::vector<int64_t> drop_axis(const std::vector<int64_t>& sizes, int axis) {
  std::vector<int64_t> out;
  for (int i = 0; i < static_cast<int>(sizes.size()); ++i)
    if (i != axis) out.push_back(sizes[i]);
  return out;
}

// Walks the elements of a factored tensor in memory order, tracking the flat indices of the
// element in the drop-P, drop-Q and drop-P-and-Q layouts.
struct FactoredCursor {
  const FactoredGeometry* geo;
  int64_t a, p, b, q, c;

  LO_HD FactoredCursor(const FactoredGeometry& g, int64_t flat) : geo(&g) {
    c = flat % g.C;
    flat /= g.C;
    q = flat % g.Q;
    flat /= g.Q;
    b = flat % g.B;
    flat /= g.B;
    p = flat % g.P;
    a = flat / g.P;
  }
  LO_HD int64_t drop_p() const { return ((a * geo->B + b) * geo->Q + q) * geo->C + c; }
  LO_HD int64_t drop_q() const { return ((a * geo->P + p) * geo->B + b) * geo->C + c; }
  LO_HD int64_t row_index() const { return geo->d0_is_p ? drop_p() : drop_q(); }
  LO_HD int64_t col_index() const { return geo->d0_is_p ? drop_q() : drop_p(); }
  // Moves n elements on, by carries rather than divisions (n is small next to the axes).
  LO_HD void advance(int64_t n) {
    c += n;
    if (c < geo->C) return;
    while (c >= geo->C) {
      c -= geo->C;
      ++q;
    }
    while (q >= geo->Q) {
      q -= geo->Q;
      ++b;
    }
    while (b >= geo->B) {
      b -= geo->B;
      ++p;
    }
    while (p >= geo->P) {
      p -= geo->P;
      ++a;
    }
  }
  LO_HD void next() {
    if (++c < geo->C) return;
    c = 0;
    if (++q < geo->Q) return;
    q = 0;
    if (++b < geo->B) return;
    b = 0;
    if (++p < geo->P) return;
    p = 0;
    ++a;
  }
};

}  // namespace lo_ops
