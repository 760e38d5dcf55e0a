// The CPU kernel shared by small_fc_lopt_step_ and velo_step_: Adafactor-style accumulators,
// normalised per-element features and a small per-element MLP, over a whole bucket of
// parameters. The optimizer-specific parts (feature layout, MLP sizes, first-layer bias, step
// scale) come from a policy type P (small_fc_lopt::Policy, velo::Policy).
//
// Three passes, each one parallel over a work list that spans all tensors, whose items threads
// take as they free up (300 small tensors cost a few parallel regions, not 900):
//   1. factored tensors: row/column means of g^2 update r and c, then the per-row mean of r
//      gives the row factors (small arrays, kept in a scratch buffer);
//   2. every element: momentum, rms and diagonal accumulators are updated in place and the
//      sum of squares of each feature is accumulated per chunk. For a factored tensor only the
//      element-wise channels are summed here; its row/column channels are sums over r and c
//      times the length of the broadcast axis;
//   3. per tensor, the normalisation scales (and P's constant inputs) are folded into the first
//      layer, and for a factored tensor the row/column channels become per-row and per-column
//      first-layer contributions; then for every element the features are rebuilt, pushed
//      through the MLP a few vector-wide tiles of elements at a time, and p is updated.
// The element loops are compiled for AVX-512, AVX2 and baseline x86-64 with vectors as wide
// as each set's registers (lane_vector.h); the processor picks one at run time. No [n, F]
// feature tensor is ever formed. Chunks have a fixed size, and per-chunk partial sums are
// combined in chunk order, so results do not depend on the number of threads.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>

#include "../checks.h"
#include "../lopt_math.h"
#include "lane_vector.h"

namespace lo_ops {
namespace cpu {

constexpr int64_t kChunk = 4096;       // elements per work item of passes 2 and 3
constexpr int64_t kReduceWork = 16384; // elements per work item of pass 1

template <class P>
struct TensorWork {
  TensorInfo info;
  at::Tensor p;  // contiguous (a copy when the parameter is not)
  at::Tensor g;  // contiguous
  float* m = nullptr;
  float* v = nullptr;
  float* row = nullptr;   // r (factored) or u (unfactored)
  float* col = nullptr;   // c (factored)
  // Scratch of a factored tensor: [3, |r|] and [3, |c|] planes, then the first-layer
  // contributions of the row and column channels in blocks (see contrib_offset).
  float* row_rsqrt = nullptr;  // rsqrt(r + 1e-8)
  float* row_fac = nullptr;    // row_factor
  float* col_rsqrt = nullptr;  // rsqrt(c + 1e-8)
  float* col_fac = nullptr;    // col_factor
  float* row_contrib = nullptr;  // b0t + the row channels' first-layer input, blocked
  float* col_contrib = nullptr;  // the column channels' first-layer input, blocked
  const float* weights = nullptr;  // this tensor's MLP, in P's packed layout
  const float* decays = nullptr;   // this tensor's decays as P::decay reads them (or null)
  float t = 0.f;         // steps already taken (small_fc_lopt's time features)
  float lr_mult = 1.f;   // VeLO's per-tensor step multiplier (small_fc_lopt: μLO's s)
  bool nan_to_num = false;  // gradients through nan_to_num first (μLO, spec 6.1)
  float step_scale = 0.f;  // step = direction * exp(exp_mult * magnitude) * step_scale
  int64_t first_chunk = 0;
  int64_t num_chunks = 0;
  // First layer with the normalisation folded in: [kHidden, kFeatures] (unfactored) or
  // [kHidden, kElementFeatures] over the element-wise channels (factored).
  std::array<float, P::kHidden * P::kFeatures> w0s{};
  std::array<float, P::kHidden> b0t{};  // first bias plus P's constant inputs

  // The first-layer contribution of hidden unit j at row (or column) index i: blocks of
  // kContribBlock consecutive indices, each holding all P::kHidden units one after the other,
  // so that a tile of consecutive indices reads one contiguous 2 KB block for all its units
  // (not one cache line from each of P::kHidden distant rows).
  static constexpr int kContribBlock = kMaxLanes;
  static LO_HD int64_t contrib_offset(int64_t i, int j) {
    return (i / kContribBlock) * (P::kHidden * kContribBlock) + j * kContribBlock +
           i % kContribBlock;
  }
  static int64_t contrib_numel(int64_t size) {
    return P::kHidden * ((size + kContribBlock - 1) / kContribBlock) * kContribBlock;
  }
  static int64_t scratch_numel(const TensorInfo& info) {
    if (!info.factored) return 0;
    const int64_t rs = info.geo.row_numel(), cs = info.geo.col_numel();
    return 2 * kFactoredChannels * (rs + cs) + contrib_numel(rs) + contrib_numel(cs);
  }
  void set_scratch(float* sp) {
    const int64_t rs = info.geo.row_numel(), cs = info.geo.col_numel();
    row_rsqrt = sp;
    row_fac = row_rsqrt + kFactoredChannels * rs;
    col_rsqrt = row_fac + kFactoredChannels * rs;
    col_fac = col_rsqrt + kFactoredChannels * cs;
    row_contrib = col_fac + kFactoredChannels * cs;
    col_contrib = row_contrib + contrib_numel(rs);
  }
};

// Builds the work list of one op call: state pointers, contiguous views and scratch. The
// returned tensor owns the scratch.
template <class P>
at::Tensor prepare_work(std::vector<TensorWork<P>>& work, const std::vector<TensorInfo>& infos,
                        at::TensorList params, at::TensorList grads, at::TensorList momentum,
                        at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                        at::TensorList fac_diag) {
  int64_t scratch_numel = 0;
  for (const auto& info : infos) scratch_numel += TensorWork<P>::scratch_numel(info);
  at::Tensor scratch = at::empty({scratch_numel}, params[0].options().dtype(at::kFloat));
  float* sp = scratch.template data_ptr<float>();
  work.resize(params.size());
  for (size_t i = 0; i < params.size(); ++i) {
    auto& w = work[i];
    w.info = infos[i];
    w.p = params[i].contiguous();
    w.g = grads[i].contiguous();
    w.m = momentum[i].template data_ptr<float>();
    w.v = rms[i].template data_ptr<float>();
    if (w.info.factored) {
      w.row = fac_row[w.info.state_index].template data_ptr<float>();
      w.col = fac_col[w.info.state_index].template data_ptr<float>();
      w.set_scratch(sp);
      sp += TensorWork<P>::scratch_numel(w.info);
    } else {
      w.row = fac_diag[w.info.state_index].template data_ptr<float>();
    }
  }
  return scratch;
}

// The gradient the step uses: P's (VeLO clips it), through nan_to_num first for μLO.
template <class P, typename V>
LO_HD V grad_of(const TensorWork<P>& w, V g) {
  return P::grad(w.nan_to_num ? nan_to_num(g) : g);
}

// Writes back parameters that were not contiguous (their work copy was updated).
template <class P>
void finish_work(std::vector<TensorWork<P>>& work, at::TensorList params) {
  for (size_t i = 0; i < params.size(); ++i)
    if (!params[i].is_same(work[i].p)) params[i].copy_(work[i].p);
}

// A reduction over the middle axis of a [O, R, I] view, for o in [o0, o1) and i in [i0, i1).
struct ReduceTask {
  int tensor;
  int kind;  // 0: g^2 over d0 -> r, 1: g^2 over d1 -> c, 2: r over its d1 -> row factor
  int64_t O, R, I;
  int64_t o0, o1, i0, i1;
};

template <typename scalar_t>
inline float load(const scalar_t* ptr, int64_t i) {
  return static_cast<float>(ptr[i]);
}

inline void add_reduce_tasks(std::vector<ReduceTask>& tasks, int tensor, int kind, int64_t O,
                             int64_t R, int64_t I) {
  const int64_t ib = std::min<int64_t>(I, 256);
  const int64_t per_task = std::max<int64_t>(1, kReduceWork / std::max<int64_t>(1, R * ib));
  for (int64_t o0 = 0; o0 < O; o0 += per_task)
    for (int64_t i0 = 0; i0 < I; i0 += ib)
      tasks.push_back({tensor, kind, O, R, I, o0, std::min(O, o0 + per_task), i0,
                       std::min(I, i0 + ib)});
}

// Tasks summing r ([*S without d0], per channel) over its copy of d1: when d0 is P the view
// [A*B, Q, C], else [A, P, B*C]; output index o * I + i is then the index in S without d0, d1.
inline void add_row_sum_tasks(std::vector<ReduceTask>& tasks, int tensor,
                              const FactoredGeometry& geo, int kind) {
  if (geo.d0_is_p)
    add_reduce_tasks(tasks, tensor, kind, geo.A * geo.B, geo.Q, geo.C);
  else
    add_reduce_tasks(tasks, tensor, kind, geo.A, geo.P, geo.B * geo.C);
}

// sum over r of x(o, r, i) for i in [i0, i1), where load(e, count) returns the `count` values
// from flat index e on as float vector lanes (the rest zero). Summed in double vector lanes,
// combined in a fixed order.
typedef double VecD4 __attribute__((vector_size(32)));
typedef double VecD8 __attribute__((vector_size(64)));
typedef double VecD16 __attribute__((vector_size(128)));
template <int L>
struct DoubleLanes;
template <>
struct DoubleLanes<4> {
  using type = VecD4;
};
template <>
struct DoubleLanes<8> {
  using type = VecD8;
};
template <>
struct DoubleLanes<16> {
  using type = VecD16;
};

template <typename V, typename Load>
LO_HD void reduce_middle(const ReduceTask& t, int64_t o, Load load, double* acc) {
  constexpr int L = kLanesOf<V>;
  using VD = typename DoubleLanes<L>::type;
  const int64_t width = t.i1 - t.i0;
  if (t.I == 1) {  // contiguous along r
    VD part{};
    const int64_t base = o * t.R;
    for (int64_t r = 0; r < t.R; r += L)
      part += __builtin_convertvector(load(base + r, static_cast<int>(std::min<int64_t>(L, t.R - r))), VD);
    double s = 0.0;
    for (int l = 0; l < L; ++l) s += part[l];
    acc[0] = s;
    return;
  }
  constexpr int kMaxVectors = 256 / L;
  VD part[kMaxVectors];
  const int vectors = static_cast<int>((width + L - 1) / L);
  for (int k = 0; k < vectors; ++k) part[k] = VD{};
  for (int64_t r = 0; r < t.R; ++r) {
    const int64_t base = (o * t.R + r) * t.I + t.i0;
    for (int k = 0; k < vectors; ++k)
      part[k] += __builtin_convertvector(
          load(base + k * L, static_cast<int>(std::min<int64_t>(L, width - k * L))), VD);
  }
  for (int k = 0; k < vectors; ++k) {
    const int count = static_cast<int>(std::min<int64_t>(L, width - k * L));
    for (int l = 0; l < count; ++l) acc[k * L + l] = part[k][l];
  }
}

// The first `count` lanes of x, the others zero.
template <typename V>
LO_HD V first_lanes(V x, int count) {
  if (count < kLanesOf<V>)
    for (int l = count; l < kLanesOf<V>; ++l) x[l] = 0.f;
  return x;
}

template <class P, typename Isa, typename scalar_t>
LO_HD void run_reduce_task(const ReduceTask& t, TensorWork<P>& w) {
  using V = typename Isa::V;
  double acc[256];
  if (t.kind == 0 || t.kind == 1) {
    const scalar_t* g = w.g.template data_ptr<scalar_t>();
    float* state = t.kind == 0 ? w.row : w.col;
    const int64_t size = t.kind == 0 ? w.info.geo.row_numel() : w.info.geo.col_numel();
    const auto gsq = [&](int64_t e, int count) {
      return first_lanes(factored_gsq(grad_of(w, load_lanes<V>(g + e, count))), count);
    };
    for (int64_t o = t.o0; o < t.o1; ++o) {
      reduce_middle<V>(t, o, gsq, acc);
      for (int64_t i = t.i0; i < t.i1; ++i) {
        const int64_t idx = o * t.I + i;
        const float mean = static_cast<float>(acc[i - t.i0] / static_cast<double>(t.R));
        for (int k = 0; k < kFactoredChannels; ++k) {
          const float decay = clip01(P::decay(w.decays, kDecayFactored + k));
          float& s = state[k * size + idx];
          s = ema(s, mean, decay);
          if (t.kind == 0) {
            w.row_rsqrt[k * size + idx] = accumulator_rsqrt(s);
          } else {
            w.col_rsqrt[k * size + idx] = accumulator_rsqrt(s);
            w.col_fac[k * size + idx] = col_factor(s);
          }
        }
      }
    }
    return;
  }
  // kind 2: mean of r over its copy of d1, then the row factors of that row.
  const int64_t size = w.info.geo.row_numel();
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float* r = w.row + k * size;
    const auto values = [&](int64_t e, int count) { return load_lanes<V>(r + e, count); };
    for (int64_t o = t.o0; o < t.o1; ++o) {
      reduce_middle<V>(t, o, values, acc);
      for (int64_t i = t.i0; i < t.i1; ++i) {
        const float mean = static_cast<float>(acc[i - t.i0] / static_cast<double>(t.R));
        for (int64_t rr = 0; rr < t.R; ++rr) {
          const int64_t e = (o * t.R + rr) * t.I + i;
          w.row_fac[k * size + e] = row_factor(r[e], mean);
        }
      }
    }
  }
}

// The phase ops' reductions (tensors that may be shards): sums, not means, written out for the
// caller to add up across shards.

// Sums of g^2 + 1e-30 (g through nan_to_num first when finite_grads, then clipped to
// [-grad_clip, grad_clip] when grad_clip > 0) over the middle axis of the task's view, into
// out[o * I + i].
template <typename Isa, typename scalar_t>
LO_HD void gsq_sum_task(const ReduceTask& t, const scalar_t* g, float grad_clip, bool finite_grads,
                        double* out) {
  using V = typename Isa::V;
  double acc[256];
  const auto gsq = [&](int64_t e, int count) {
    V x = load_lanes<V>(g + e, count);
    if (finite_grads) x = nan_to_num(x);
    if (grad_clip > 0.f) x = clip(x, -grad_clip, grad_clip);
    return first_lanes(factored_gsq(x), count);
  };
  for (int64_t o = t.o0; o < t.o1; ++o) {
    reduce_middle<V>(t, o, gsq, acc);
    for (int64_t i = t.i0; i < t.i1; ++i) out[o * t.I + i] = acc[i - t.i0];
  }
}

// Sums of each of r's channels (planes of `size` values) over the middle axis of the task's
// view, into out[k * out_size + o * I + i].
template <typename Isa>
LO_HD void row_sum_task(const ReduceTask& t, const float* r, int64_t size, int64_t out_size,
                        double* out) {
  using V = typename Isa::V;
  double acc[256];
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float* plane = r + k * size;
    const auto values = [&](int64_t e, int count) { return load_lanes<V>(plane + e, count); };
    for (int64_t o = t.o0; o < t.o1; ++o) {
      reduce_middle<V>(t, o, values, acc);
      for (int64_t i = t.i0; i < t.i1; ++i) out[k * out_size + o * t.I + i] = acc[i - t.i0];
    }
  }
}

// Where the elements of a tile of a factored tensor read their row- and column-indexed
// values. Within one run of the innermost varying axis each index is either consecutive
// across the tile (a vector load) or constant (a broadcast); otherwise per-lane indices.
struct TileIndex {
  bool run = false;
  bool row_consecutive = false, col_consecutive = false;
  int64_t row[kMaxLanes], col[kMaxLanes];  // row[0]/col[0] only when `run`
};

LO_HD void tile_index(const FactoredCursor& at, int count, TileIndex& t) {
  const FactoredGeometry& geo = *at.geo;
  FactoredCursor cur = at;
  const bool c_run = geo.C > 1 && cur.c + count <= geo.C;   // r and c indices consecutive
  const bool q_run = geo.C == 1 && cur.q + count <= geo.Q;  // drop-P index consecutive
  t.run = c_run || q_run;
  if (t.run) {
    t.row[0] = cur.row_index();
    t.col[0] = cur.col_index();
    t.row_consecutive = c_run || geo.d0_is_p;
    t.col_consecutive = c_run || !geo.d0_is_p;
    return;
  }
  for (int l = 0; l < count; ++l, cur.next()) {
    t.row[l] = cur.row_index();
    t.col[l] = cur.col_index();
  }
}

// `planes` planes of `size` values each, indexed like r (`by_row`) or like c, for the tile.
template <typename V>
LO_HD void load_planes(const TileIndex& t, bool by_row, const float* base, int64_t size,
                       int planes, int count, V* out) {
  const int64_t* index = by_row ? t.row : t.col;
  const bool consecutive = by_row ? t.row_consecutive : t.col_consecutive;
  for (int k = 0; k < planes; ++k) {
    const float* src = base + k * size;
    if (t.run) {
      out[k] = consecutive ? load_lanes<V>(src + index[0], count) : splat<V>(src[index[0]]);
    } else {
      V v{};
      for (int l = 0; l < count; ++l) v[l] = src[index[l]];
      out[k] = v;
    }
  }
}

// The first-layer bias of a factored tensor's tile h, into b0[j].t[h]: (b0t + row
// contribution) + column contribution, where row_contrib already holds the sum in brackets
// (fold_first_layer). Within a run, one side is consecutive and the other constant (or both
// consecutive): a full tile whose consecutive indices lie in one contribution block reads
// them with vector loads, the constant side with broadcasts.
template <class P, typename V, int N>
LO_HD void first_layer_bias(const TensorWork<P>& w, const TileIndex& ti, int count,
                            LaneGroup<V, N> (&b0)[P::kHidden], int h) {
  using W = TensorWork<P>;
  constexpr int L = kLanesOf<V>;
  const auto in_block = [](int64_t i) { return i % W::kContribBlock + L <= W::kContribBlock; };
  if (ti.run && count == L && (!ti.row_consecutive || in_block(ti.row[0])) &&
      (!ti.col_consecutive || in_block(ti.col[0]))) {
    const float* rc = w.row_contrib + W::contrib_offset(ti.row[0], 0);
    const float* cc = w.col_contrib + W::contrib_offset(ti.col[0], 0);
    constexpr int kStride = W::kContribBlock;  // from unit j to unit j + 1
    V r, c;
    if (ti.row_consecutive && ti.col_consecutive) {
      for (int j = 0; j < P::kHidden; ++j) {
        std::memcpy(&r, rc + j * kStride, sizeof(r));
        std::memcpy(&c, cc + j * kStride, sizeof(c));
        b0[j].t[h] = r + c;
      }
    } else if (ti.row_consecutive) {
      for (int j = 0; j < P::kHidden; ++j) {
        std::memcpy(&r, rc + j * kStride, sizeof(r));
        b0[j].t[h] = r + cc[j * kStride];  // the scalar is broadcast
      }
    } else {
      for (int j = 0; j < P::kHidden; ++j) {
        std::memcpy(&c, cc + j * kStride, sizeof(c));
        b0[j].t[h] = rc[j * kStride] + c;
      }
    }
    return;
  }
  TileIndex lanes = ti;  // per-lane indices
  if (ti.run) {
    for (int l = 0; l < count; ++l) {
      lanes.row[l] = ti.row[0] + (ti.row_consecutive ? l : 0);
      lanes.col[l] = ti.col[0] + (ti.col_consecutive ? l : 0);
    }
  }
  for (int j = 0; j < P::kHidden; ++j) {
    V r{}, c{};
    for (int l = 0; l < count; ++l) {
      r[l] = w.row_contrib[W::contrib_offset(lanes.row[l], j)];
      c[l] = w.col_contrib[W::contrib_offset(lanes.col[l], j)];
    }
    b0[j].t[h] = r + c;
  }
}

// The inputs of the `count` consecutive elements starting at `e0`, one vector lane per
// element (lanes past `count` carry harmless finite values). With `update_state`, the
// momentum, rms and diagonal accumulators are updated in place first (pass 2); otherwise they
// are read as updated (pass 3). For a factored tensor only the row/column factors are read:
// its row and column channels enter through per-row/per-column sums (see fold_first_layer).
template <class P, typename V, typename scalar_t, bool update_state, bool factored>
LO_HD void tile_inputs(TensorWork<P>& w, const scalar_t* g, const scalar_t* p, int64_t e0,
                       int count, const TileIndex& ti,
                       ElementInputs<V>& in) {
  const int64_t n = w.info.numel;
  in.g = grad_of(w, load_lanes<V>(g + e0, count));
  in.p = load_lanes<V>(p + e0, count);
  for (int k = 0; k < kMomentumChannels; ++k) {
    float* m = w.m + k * n + e0;
    in.m[k] = load_lanes<V>(m, count);
    if (update_state) {
      in.m[k] = ema(in.m[k], in.g, P::decay(w.decays, kDecayMomentum + k));
      store_lanes(m, in.m[k], count);
    }
  }
  in.v = load_lanes<V>(w.v + e0, count);
  if (update_state) {
    in.v = ema(in.v, in.g * in.g, clip01(P::decay(w.decays, kDecayRms)));
    store_lanes(w.v + e0, in.v, count);
  }
  if (factored) {
    V rf[kFactoredChannels], cf[kFactoredChannels];
    load_planes(ti, true, w.row_fac, w.info.geo.row_numel(), kFactoredChannels, count, rf);
    load_planes(ti, false, w.col_fac, w.info.geo.col_numel(), kFactoredChannels, count, cf);
    set_factored_factors(in, rf, cf);
  } else {
    V u[kFactoredChannels];
    for (int k = 0; k < kFactoredChannels; ++k) {
      float* state = w.row + k * n + e0;
      u[k] = load_lanes<V>(state, count);
      if (update_state) {
        u[k] = ema(u[k], factored_gsq(in.g), clip01(P::decay(w.decays, kDecayFactored + k)));
        store_lanes(state, u[k], count);
      }
    }
    set_unfactored(in, u, P::kUnfactoredMomentumEps);
  }
}

// The features the first layer reads per element: the element-wise channels of a factored
// tensor, all channels of an unfactored one.
template <class P, bool factored>
constexpr int kTileFeatures = factored ? P::kElementFeatures : P::kFeatures;

template <class P, bool factored, typename V>
LO_HD void tile_features(const ElementInputs<V>& in, V (&x)[kTileFeatures<P, factored>]) {
  if constexpr (factored)
    P::element_features(in, x);
  else
    P::features(in, x);
}

// Sums of squares of the features over [e0, e1): float sums over at most kFloatTiles tiles
// per lane, folded into per-lane double sums, combined over lanes in a fixed order.
constexpr int kFloatTiles = 8;

template <class P, typename Isa, typename scalar_t, bool factored>
LO_HD void accumulate_chunk(TensorWork<P>& w, int64_t e0, int64_t e1, double* sums) {
  using V = typename Isa::V;
  constexpr int L = kLanesOf<V>;
  constexpr int kF = kTileFeatures<P, factored>;
  double acc[kF][L] = {};
  V part[kF];
  for (int c = 0; c < kF; ++c) part[c] = V{};
  V x[kF];
  TileIndex ti;
  ElementInputs<V> in;
  const scalar_t* g = w.g.template data_ptr<scalar_t>();
  const scalar_t* p = w.p.template data_ptr<scalar_t>();
  int tiles = 0;
  FactoredCursor cursor(w.info.geo, factored ? e0 : 0);
  for (int64_t e = e0; e < e1; e += L) {
    const int count = static_cast<int>(std::min<int64_t>(L, e1 - e));
    if (factored) {
      tile_index(cursor, count, ti);
      cursor.advance(L);
    }
    tile_inputs<P, V, scalar_t, true, factored>(w, g, p, e, count, ti, in);
    tile_features<P, factored>(in, x);
    if (count < L) {  // padding lanes do not count
      for (int c = 0; c < kF; ++c)
        for (int l = count; l < L; ++l) x[c][l] = 0.f;
    }
    for (int c = 0; c < kF; ++c) part[c] += x[c] * x[c];
    if (++tiles == kFloatTiles || e + L >= e1) {
      for (int c = 0; c < kF; ++c) {
        for (int l = 0; l < L; ++l) acc[c][l] += part[c][l];
        part[c] = V{};
      }
      tiles = 0;
    }
  }
  for (int c = 0; c < P::kFeatures; ++c) sums[c] = 0.0;
  for (int c = 0; c < kF; ++c) {
    double s = 0.0;
    for (int l = 0; l < L; ++l) s += acc[c][l];
    sums[factored ? P::element_channel(c) : c] = s;
  }
}

template <class P, typename Isa, typename scalar_t, bool factored>
LO_HD void update_chunk(TensorWork<P>& w, int64_t e0, int64_t e1, float lr, float weight_decay,
                        float exp_mult) {
  using V = typename Isa::V;
  using Group = LaneGroup<V, Isa::kTiles>;
  constexpr int L = kLanesOf<V>;
  constexpr int N = Isa::kTiles;
  constexpr int kF = kTileFeatures<P, factored>;
  constexpr int H = P::kHidden;
  const scalar_t* g = w.g.template data_ptr<scalar_t>();
  scalar_t* p = w.p.template data_ptr<scalar_t>();
  const float* weights = w.weights;
  Group x[kF], b0[H], direction, magnitude;
  V p_old[N];
  TileIndex ti;
  ElementInputs<V> in;
  FactoredCursor cursor(w.info.geo, factored ? e0 : 0);
  // N tiles at a time; missing tiles at the end are zero padding (results dropped).
  for (int64_t e = e0; e < e1; e += N * L) {
    int count[N];
    for (int h = 0; h < N; ++h) {
      const int64_t eh = e + h * L;
      count[h] = static_cast<int>(std::max<int64_t>(0, std::min<int64_t>(L, e1 - eh)));
      if (count[h] == 0) {
        for (int c = 0; c < kF; ++c) x[c].t[h] = V{};
        for (int j = 0; j < H; ++j) b0[j].t[h] = V{};
        p_old[h] = V{};
        continue;
      }
      if (factored) {
        tile_index(cursor, count[h], ti);
        cursor.advance(L);
      }
      tile_inputs<P, V, scalar_t, false, factored>(w, g, p, eh, count[h], ti, in);
      V xh[kF];
      tile_features<P, factored>(in, xh);
      for (int c = 0; c < kF; ++c) x[c].t[h] = xh[c];
      p_old[h] = in.p;
      if constexpr (factored) first_layer_bias(w, ti, count[h], b0, h);
    }
    if constexpr (factored) {
      mlp_forward<kF, H>(x, w.w0s.data(), b0, weights + P::kW1, weights + P::kB1,
                         weights + P::kW2, weights + P::kB2, direction, magnitude);
    } else {
      mlp_forward<kF, H>(x, w.w0s.data(), w.b0t.data(), weights + P::kW1, weights + P::kB1,
                         weights + P::kW2, weights + P::kB2, direction, magnitude);
    }
    for (int h = 0; h < N; ++h) {
      if (count[h] == 0) continue;
      const V step = step_from_outputs(direction.t[h], magnitude.t[h], exp_mult, w.step_scale);
      const V updated = apply_step(p_old[h], step, lr, weight_decay);
      store_lanes(p + e + h * L, updated, count[h]);
    }
  }
}

// One entry point per instruction set and kernel, compiled for that set; the bodies above are
// inlined into them. select_isa() picks one at run time from what the processor supports.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LO_TARGET_AVX512 __attribute__((target("avx512f,avx512dq,avx512bw,avx512vl,avx2,fma")))
#define LO_TARGET_AVX2 __attribute__((target("avx2,fma")))
#define LO_HAVE_ISA_CLONES 1
#else
#define LO_TARGET_AVX512
#define LO_TARGET_AVX2
#define LO_HAVE_ISA_CLONES 0
#endif

#define LO_DEFINE_ENTRIES(NAME, ISA, TARGET)                                                   \
  template <class P, typename scalar_t>                                                        \
  TARGET void reduce_task_##NAME(const ReduceTask& t, TensorWork<P>& w) {                      \
    run_reduce_task<P, ISA, scalar_t>(t, w);                                                   \
  }                                                                                            \
  template <class P, typename scalar_t, bool factored>                                         \
  TARGET void accumulate_chunk_##NAME(TensorWork<P>& w, int64_t e0, int64_t e1, double* sums) { \
    accumulate_chunk<P, ISA, scalar_t, factored>(w, e0, e1, sums);                             \
  }                                                                                            \
  template <class P, typename scalar_t, bool factored>                                         \
  TARGET void update_chunk_##NAME(TensorWork<P>& w, int64_t e0, int64_t e1, float lr,          \
                                  float wd, float em) {                                        \
    update_chunk<P, ISA, scalar_t, factored>(w, e0, e1, lr, wd, em);                           \
  }

// state <- ema(state, sums / count, decay) over `size` values: phase 2's r and c from complete
// sums, compiled like pass 1 (one entry per instruction set) so that it rounds the same.
LO_HD void ema_of_sums(float* state, const double* sums, int64_t size, double count, float decay) {
  for (int64_t e = 0; e < size; ++e)
    state[e] = ema(state[e], static_cast<float>(sums[e] / count), decay);
}

#define LO_DEFINE_SUM_ENTRIES(NAME, ISA, TARGET)                                               \
  template <typename scalar_t>                                                                 \
  TARGET void gsq_sum_task_##NAME(const ReduceTask& t, const scalar_t* g, float clip,          \
                                  bool finite_grads, double* out) {                            \
    gsq_sum_task<ISA, scalar_t>(t, g, clip, finite_grads, out);                                \
  }                                                                                            \
  TARGET inline void row_sum_task_##NAME(const ReduceTask& t, const float* r, int64_t size,    \
                                         int64_t out_size, double* out) {                      \
    row_sum_task<ISA>(t, r, size, out_size, out);                                              \
  }                                                                                            \
  TARGET inline void ema_of_sums_##NAME(float* state, const double* sums, int64_t size,        \
                                        double count, float decay) {                           \
    ema_of_sums(state, sums, size, count, decay);                                              \
  }

LO_DEFINE_ENTRIES(base, IsaBase, )
LO_DEFINE_SUM_ENTRIES(base, IsaBase, )
#if LO_HAVE_ISA_CLONES
LO_DEFINE_ENTRIES(avx2, IsaAvx2, LO_TARGET_AVX2)
LO_DEFINE_ENTRIES(avx512, IsaAvx512, LO_TARGET_AVX512)
LO_DEFINE_SUM_ENTRIES(avx2, IsaAvx2, LO_TARGET_AVX2)
LO_DEFINE_SUM_ENTRIES(avx512, IsaAvx512, LO_TARGET_AVX512)
#endif

enum class CpuIsa { kBase = 0, kAvx2 = 1, kAvx512 = 2 };

// The widest set the processor has, capped by LO_OPS_CPU_ISA=base|avx2|avx512 if set.
inline CpuIsa select_isa() {
  CpuIsa best = CpuIsa::kBase;
#if LO_HAVE_ISA_CLONES
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) best = CpuIsa::kAvx2;
  if (best == CpuIsa::kAvx2 && __builtin_cpu_supports("avx512f") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl"))
    best = CpuIsa::kAvx512;
#endif
  const char* cap = std::getenv("LO_OPS_CPU_ISA");
  if (cap != nullptr) {
    const std::string c(cap);
    TORCH_CHECK(c == "base" || c == "avx2" || c == "avx512",
                "LO_OPS_CPU_ISA must be base, avx2 or avx512, got '", c, "'");
    const CpuIsa wanted = c == "base" ? CpuIsa::kBase : c == "avx2" ? CpuIsa::kAvx2 : CpuIsa::kAvx512;
    if (static_cast<int>(wanted) < static_cast<int>(best)) best = wanted;
  }
  return best;
}

template <class P, typename scalar_t>
void reduce_task_for(CpuIsa isa, const ReduceTask& t, TensorWork<P>& w) {
#if LO_HAVE_ISA_CLONES
  if (isa == CpuIsa::kAvx512) return reduce_task_avx512<P, scalar_t>(t, w);
  if (isa == CpuIsa::kAvx2) return reduce_task_avx2<P, scalar_t>(t, w);
#endif
  reduce_task_base<P, scalar_t>(t, w);
}

template <class P, typename scalar_t, bool factored>
void accumulate_chunk_for(CpuIsa isa, TensorWork<P>& w, int64_t e0, int64_t e1, double* sums) {
#if LO_HAVE_ISA_CLONES
  if (isa == CpuIsa::kAvx512) return accumulate_chunk_avx512<P, scalar_t, factored>(w, e0, e1, sums);
  if (isa == CpuIsa::kAvx2) return accumulate_chunk_avx2<P, scalar_t, factored>(w, e0, e1, sums);
#endif
  accumulate_chunk_base<P, scalar_t, factored>(w, e0, e1, sums);
}

template <class P, typename scalar_t, bool factored>
void update_chunk_for(CpuIsa isa, TensorWork<P>& w, int64_t e0, int64_t e1, float lr, float wd,
                      float em) {
#if LO_HAVE_ISA_CLONES
  if (isa == CpuIsa::kAvx512) return update_chunk_avx512<P, scalar_t, factored>(w, e0, e1, lr, wd, em);
  if (isa == CpuIsa::kAvx2) return update_chunk_avx2<P, scalar_t, factored>(w, e0, e1, lr, wd, em);
#endif
  update_chunk_base<P, scalar_t, factored>(w, e0, e1, lr, wd, em);
}

template <typename scalar_t>
void gsq_sum_task_for(CpuIsa isa, const ReduceTask& t, const scalar_t* g, float clip, bool finite_grads,
                      double* out) {
#if LO_HAVE_ISA_CLONES
  if (isa == CpuIsa::kAvx512) return gsq_sum_task_avx512(t, g, clip, finite_grads, out);
  if (isa == CpuIsa::kAvx2) return gsq_sum_task_avx2(t, g, clip, finite_grads, out);
#endif
  gsq_sum_task_base(t, g, clip, finite_grads, out);
}

inline void row_sum_task_for(CpuIsa isa, const ReduceTask& t, const float* r, int64_t size,
                             int64_t out_size, double* out) {
#if LO_HAVE_ISA_CLONES
  if (isa == CpuIsa::kAvx512) return row_sum_task_avx512(t, r, size, out_size, out);
  if (isa == CpuIsa::kAvx2) return row_sum_task_avx2(t, r, size, out_size, out);
#endif
  row_sum_task_base(t, r, size, out_size, out);
}

inline void ema_of_sums_for(CpuIsa isa, float* state, const double* sums, int64_t size,
                            double count, float decay) {
#if LO_HAVE_ISA_CLONES
  if (isa == CpuIsa::kAvx512) return ema_of_sums_avx512(state, sums, size, count, decay);
  if (isa == CpuIsa::kAvx2) return ema_of_sums_avx2(state, sums, size, count, decay);
#endif
  ema_of_sums_base(state, sums, size, count, decay);
}

// Sum of squares of `size` values (double, in order).
inline double sum_squares(const float* base, int64_t size) {
  double s = 0.0;
  for (int64_t i = 0; i < size; ++i) s += static_cast<double>(base[i]) * base[i];
  return s;
}

// The sums of squares of one side's channels (values: channels 0..2 of `sums`, rsqrt: 6..8)
// over the whole tensor, where each accumulator value stands for `broadcast` elements.
inline void accumulator_sums(const float* values, const float* rsqrts, int64_t size,
                             double broadcast, double* sums) {
  constexpr int kRsqrtOffset = 2 * kFactoredChannels;
  for (int k = 0; k < kFactoredChannels; ++k) {
    sums[k] = broadcast * sum_squares(values + k * size, size);
    sums[kRsqrtOffset + k] = broadcast * sum_squares(rsqrts + k * size, size);
  }
}

// out[offset(i)] = base + the first-layer input of hidden unit j from one side's channels at
// index i (base: b0t[j] for the rows, none for the columns); `ws` holds that unit's scaled
// weights of the side's channels (values 0..2, rsqrt 6..8). One contribution block at a time,
// whose kContribBlock consecutive outputs the compiler vectorises.
template <class P>
void accumulator_contribution(const float* ws, const float* values, const float* rsqrts,
                              int64_t size, int j, const float* base, float* out) {
  constexpr int kRsqrtOffset = 2 * kFactoredChannels;
  constexpr int kBlock = TensorWork<P>::kContribBlock;
  for (int64_t i0 = 0; i0 < size; i0 += kBlock) {
    const int64_t width = std::min<int64_t>(kBlock, size - i0);
    float* dst = out + TensorWork<P>::contrib_offset(i0, j);
    for (int64_t l = 0; l < width; ++l) {
      float acc = 0.f;
      for (int k = 0; k < kFactoredChannels; ++k) {
        acc += ws[k] * values[k * size + i0 + l];
        acc += ws[kRsqrtOffset + k] * rsqrts[k * size + i0 + l];
      }
      dst[l] = base != nullptr ? *base + acc : acc;
    }
  }
}

// The sums of squares of a factored tensor's row and column channels over its elements, into
// `sums` (F channels): each r value stands for the tensor's length along d0, each c value for
// its length along d1 (of a shard: the shard's lengths, so that the shards' sums add up).
template <class P>
void set_accumulator_sums(const TensorWork<P>& w, double* sums) {
  if (!w.info.factored) return;
  const auto& geo = w.info.geo;
  const double d0_len = static_cast<double>(geo.d0_is_p ? geo.P : geo.Q);
  const double d1_len = static_cast<double>(geo.d0_is_p ? geo.Q : geo.P);
  accumulator_sums(w.row, w.row_rsqrt, geo.row_numel(), d0_len, sums + P::kFirstRowChannel);
  accumulator_sums(w.col, w.col_rsqrt, geo.col_numel(), d1_len, sums + P::kFirstColChannel);
}

// Folds the normalisation scales (from `sums`, the complete sums of squares of the F feature
// channels over the whole tensor) and P's constant inputs into the first layer of `w`, and
// sets its step scale; for a factored tensor turns the row/column channels into per-row and
// per-column first-layer contributions.
template <class P>
void fold_first_layer(TensorWork<P>& w, const double* sums, float step_mult) {
  constexpr int F = P::kFeatures;
  const int64_t rsize = w.info.factored ? w.info.geo.row_numel() : 0;
  const int64_t csize = w.info.factored ? w.info.geo.col_numel() : 0;
  float scale[F];
  for (int c = 0; c < F; ++c) scale[c] = normalisation_scale(sums[c], w.info.total_numel);
  w.step_scale = P::step_scale(w.lr_mult, sums[P::kParamChannel], w.info.total_numel, step_mult);
  for (int j = 0; j < P::kHidden; ++j) {
    const float* row = w.weights + P::kW0 + j * P::kInputs;
    float ws[F];
    for (int c = 0; c < F; ++c) ws[c] = row[c] * scale[c];
    w.b0t[j] = P::first_bias(w.weights, w.t, j);
    if (!w.info.factored) {
      for (int c = 0; c < F; ++c) w.w0s[j * F + c] = ws[c];
      continue;
    }
    for (int i = 0; i < P::kElementFeatures; ++i)
      w.w0s[j * P::kElementFeatures + i] = ws[P::element_channel(i)];
    // A tile's bias is (b0t + row contribution) + column contribution: the bracket is taken
    // here, once per row instead of once per element.
    accumulator_contribution<P>(ws + P::kFirstRowChannel, w.row, w.row_rsqrt, rsize, j,
                                &w.b0t[j], w.row_contrib);
    accumulator_contribution<P>(ws + P::kFirstColChannel, w.col, w.col_rsqrt, csize, j,
                                nullptr, w.col_contrib);
  }
}

// Runs fn(i) for every work item i. Each thread takes the next unclaimed item (in list order)
// whenever it finishes one, so a thread slowed down by another process on its core simply runs
// fewer items, and a list of large tensors followed by many small ones still ends evenly. Each
// item runs exactly once; items write only their own outputs, so results do not depend on
// which thread ran which item. A bucket whose total cost (about one unit per element) is
// below kSerialCost runs on the calling thread: waking the others would cost more.
constexpr int64_t kSerialCost = 32768;

template <typename Cost, typename F>
void parallel_items(int64_t n, Cost cost, F fn) {
  int64_t total = 0;
  for (int64_t i = 0; i < n; ++i) total += cost(i) + 1;
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), n);
  if (threads <= 1 || total < kSerialCost || at::in_parallel_region()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
  std::atomic<int64_t> next{0};
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) {
    for (int64_t i = next.fetch_add(1, std::memory_order_relaxed); i < n;
         i = next.fetch_add(1, std::memory_order_relaxed))
      fn(i);
  });
}

// Pass 1 of a whole-tensor step: r and c from the means of g^2, then the row factors.
template <class P, typename scalar_t>
void factored_pass(std::vector<TensorWork<P>>& work, CpuIsa isa) {
  std::vector<ReduceTask> reduce;
  for (int ti = 0; ti < static_cast<int>(work.size()); ++ti) {
    const auto& w = work[ti];
    if (!w.info.factored || w.info.numel == 0) continue;
    const auto& geo = w.info.geo;
    // Sum over P: view [A, P, B*Q*C]; sum over Q: view [A*P*B, Q, C].
    const int kind_p = geo.d0_is_p ? 0 : 1;
    add_reduce_tasks(reduce, ti, kind_p, geo.A, geo.P, geo.B * geo.Q * geo.C);
    add_reduce_tasks(reduce, ti, 1 - kind_p, geo.A * geo.P * geo.B, geo.Q, geo.C);
  }
  const auto reduce_cost = [&](int64_t i) {
    return (reduce[i].o1 - reduce[i].o0) * reduce[i].R * (reduce[i].i1 - reduce[i].i0);
  };
  parallel_items(static_cast<int64_t>(reduce.size()), reduce_cost, [&](int64_t i) {
    reduce_task_for<P, scalar_t>(isa, reduce[i], work[reduce[i].tensor]);
  });
  reduce.clear();
  for (int ti = 0; ti < static_cast<int>(work.size()); ++ti) {
    const auto& w = work[ti];
    if (!w.info.factored || w.info.numel == 0) continue;
    add_row_sum_tasks(reduce, ti, w.info.geo, 2);
  }
  parallel_items(static_cast<int64_t>(reduce.size()), reduce_cost, [&](int64_t i) {
    reduce_task_for<P, scalar_t>(isa, reduce[i], work[reduce[i].tensor]);
  });
}

// The work items of passes 2 and 3: kChunk elements of one tensor each, tensor by tensor.
struct Chunk {
  int tensor;
  int64_t e0, e1;
};

template <class P>
std::vector<Chunk> make_chunks(std::vector<TensorWork<P>>& work) {
  std::vector<Chunk> chunks;
  for (int ti = 0; ti < static_cast<int>(work.size()); ++ti) {
    auto& w = work[ti];
    w.first_chunk = static_cast<int64_t>(chunks.size());
    for (int64_t e0 = 0; e0 < w.info.numel; e0 += kChunk)
      chunks.push_back({ti, e0, std::min(w.info.numel, e0 + kChunk)});
    w.num_chunks = static_cast<int64_t>(chunks.size()) - w.first_chunk;
  }
  return chunks;
}

inline int64_t chunk_cost(const Chunk& c) { return c.e1 - c.e0 + kMaxLanes; }

// Pass 2: momentum, rms and diagonal accumulators in place; returns each tensor's sums of
// squares of its element-wise feature channels, [T, F] (chunk sums added in chunk order; a
// factored tensor's row/column channels are left 0).
template <class P, typename scalar_t>
std::vector<double> element_pass(std::vector<TensorWork<P>>& work, const std::vector<Chunk>& chunks,
                                 CpuIsa isa) {
  constexpr int F = P::kFeatures;
  std::vector<double> sums(chunks.size() * F);
  parallel_items(static_cast<int64_t>(chunks.size()),
                 [&](int64_t i) { return chunk_cost(chunks[i]); }, [&](int64_t i) {
    const Chunk& c = chunks[i];
    auto& w = work[c.tensor];
    double* out = sums.data() + i * F;
    if (w.info.factored)
      accumulate_chunk_for<P, scalar_t, true>(isa, w, c.e0, c.e1, out);
    else
      accumulate_chunk_for<P, scalar_t, false>(isa, w, c.e0, c.e1, out);
  });
  std::vector<double> totals(work.size() * F, 0.0);
  for (size_t ti = 0; ti < work.size(); ++ti) {
    const auto& w = work[ti];
    for (int64_t ci = w.first_chunk; ci < w.first_chunk + w.num_chunks; ++ci)
      for (int c = 0; c < F; ++c) totals[ti * F + c] += sums[ci * F + c];
  }
  return totals;
}

// Pass 3: the per-tensor constants folded into the first layer, then the MLP and the update.
// `sums` ([T, F]) are each tensor's complete feature sums of squares; with
// `add_accumulators`, `sums` hold pass 2's element-wise sums and the row/column channels are
// added here (the tensors are whole).
template <class P, typename scalar_t>
void update_pass(std::vector<TensorWork<P>>& work, const std::vector<Chunk>& chunks, CpuIsa isa,
                 double* sums, bool add_accumulators, float lr, double weight_decay,
                 double step_mult, double exp_mult) {
  constexpr int F = P::kFeatures;
  const auto fold_cost = [&](int64_t ti) {
    const auto& info = work[ti].info;
    return info.factored ? P::kHidden * (info.geo.row_numel() + info.geo.col_numel())
                         : int64_t{P::kHidden};
  };
  const float sm = static_cast<float>(step_mult);
  parallel_items(static_cast<int64_t>(work.size()), fold_cost, [&](int64_t ti) {
    auto& w = work[ti];
    if (w.info.numel == 0) return;
    if (add_accumulators) set_accumulator_sums(w, sums + ti * F);
    fold_first_layer(w, sums + ti * F, sm);
  });
  const float wd = static_cast<float>(weight_decay), em = static_cast<float>(exp_mult);
  parallel_items(static_cast<int64_t>(chunks.size()),
                 [&](int64_t i) { return chunk_cost(chunks[i]); }, [&](int64_t i) {
    const Chunk& c = chunks[i];
    auto& w = work[c.tensor];
    if (w.info.factored)
      update_chunk_for<P, scalar_t, true>(isa, w, c.e0, c.e1, lr, wd, em);
    else
      update_chunk_for<P, scalar_t, false>(isa, w, c.e0, c.e1, lr, wd, em);
  });
}

// Whether any gradient of the bucket holds a NaN or an infinity: one read of every gradient,
// parallel over the chunks of passes 2 and 3 (x * 0 is 0 exactly when x is finite; the
// integer OR over a chunk vectorises).
template <class P, typename scalar_t>
bool any_nonfinite(const std::vector<TensorWork<P>>& work, const std::vector<Chunk>& chunks) {
  std::vector<uint8_t> bad(chunks.size(), 0);
  parallel_items(static_cast<int64_t>(chunks.size()),
                 [&](int64_t i) { return chunk_cost(chunks[i]) / 8; }, [&](int64_t i) {
    const Chunk& c = chunks[i];
    const scalar_t* g = work[c.tensor].g.template data_ptr<scalar_t>();
    int found = 0;
    for (int64_t e = c.e0; e < c.e1; ++e) found |= !(static_cast<float>(g[e]) * 0.f == 0.f);
    bad[i] = static_cast<uint8_t>(found);
  });
  return std::any_of(bad.begin(), bad.end(), [](uint8_t b) { return b != 0; });
}

// One step over a bucket of whole tensors: `work` filled by prepare_work, with `weights` (and
// P's per-tensor values) set for every tensor. With `check_finite`, a bucket whose gradients
// hold a NaN or an infinity is left entirely unchanged; returns whether the step was taken.
template <class P, typename scalar_t>
bool step_bucket(std::vector<TensorWork<P>>& work, float lr, double weight_decay,
                 double step_mult, double exp_mult, bool check_finite) {
  const CpuIsa isa = select_isa();
  const std::vector<Chunk> chunks = make_chunks(work);
  if (check_finite && any_nonfinite<P, scalar_t>(work, chunks)) return false;
  factored_pass<P, scalar_t>(work, isa);
  std::vector<double> sums = element_pass<P, scalar_t>(work, chunks, isa);
  update_pass<P, scalar_t>(work, chunks, isa, sums.data(), true, lr, weight_decay, step_mult,
                           exp_mult);
  return true;
}

// One op call over a bucket: its work list, setup(i, work[i]) for P's per-tensor values
// (weights, decays, step count, lr_mult), the passes, and the write-back of non-contiguous
// parameters. Returns whether the step was taken (see step_bucket's `check_finite`).
template <class P, typename Setup>
bool run_bucket(const std::vector<TensorInfo>& infos, at::TensorList params,
                at::TensorList grads, at::TensorList momentum, at::TensorList rms,
                at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
                const at::Tensor& lr, double weight_decay,
                double step_mult, double exp_mult, bool check_finite, Setup setup) {
  const float lr_value = lr.item<float>();
  std::vector<TensorWork<P>> work;
  const at::Tensor scratch =
      prepare_work(work, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < params.size(); ++i) setup(i, work[i]);
  bool stepped = false;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(), "lo_ops_cpu", [&] {
    stepped = step_bucket<P, scalar_t>(work, lr_value, weight_decay, step_mult, exp_mult,
                                       check_finite);
  });
  if (stepped) finish_work(work, params);
  return stepped;
}

}  // namespace cpu
}  // namespace lo_ops
