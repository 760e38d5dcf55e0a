// CUDA kernels shared by small_fc_lopt_step_ and velo_step_: plain CUDA on raw pointers (no
// torch headers), the optimizer-specific parts from a policy P (small_fc_lopt::Policy,
// velo::Policy), the per-element maths from the shared headers. The passes mirror the CPU
// kernel (cpu/adafactor_mlp_cpu.h):
//   1. factored tensors: means of g^2 over d0 and d1 update r and c (one thread per output,
//      summing in double in a fixed order), then the row factors (one thread per row of r);
//   2. one block per chunk of kChunk elements: momentum, rms and diagonal accumulators are
//      updated and each chunk's sums of squares of the features are written out (block
//      reductions in a fixed order, no atomics);
//   3. one block per tensor folds the normalisation scales and P's constant inputs into the
//      first layer (and, for a factored tensor, turns its row/column channels into per-row and
//      per-column first-layer terms);
//   4. one block per chunk: features, the MLP (one element per thread) and the update.
// Tensors reach the kernels through tables passed by value (kMaxTensors per launch; the host
// launches again while tensors remain). Values that change every step (lr, the step count,
// VeLO's lr_mult and skip flag) are read from device memory, so a captured graph replays.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../factored.h"
#include "../lopt_math.h"

namespace lo_ops {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kElementsPerThread = 8;
constexpr int64_t kChunk = kThreads * kElementsPerThread;  // elements per block
constexpr int kMaxTensors = 15;  // tensors per launch: the table stays within 4 KB of parameters

// Storage types: float, double, __half, __nv_bfloat16; maths in float.
template <typename S>
__device__ __forceinline__ float to_float(S x) {
  return static_cast<float>(x);
}
template <>
__device__ __forceinline__ float to_float<__half>(__half x) {
  return __half2float(x);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) {
  return __bfloat162float(x);
}
template <typename S>
__device__ __forceinline__ S from_float(float x) {
  return static_cast<S>(x);
}
template <>
__device__ __forceinline__ __half from_float<__half>(float x) {
  return __float2half_rn(x);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) {
  return __float2bfloat16_rn(x);
}

// One parameter of a bucket and everything the passes read or write for it.
struct TensorArgs {
  void* p;
  const void* g;
  float* m;         // [3, n]
  float* v;         // [n]
  float* row;       // r [3, |r|] (factored) or u [3, n]
  float* col;       // c [3, |c|] (factored)
  float* row_rsqrt;  // scratch of a factored tensor, as in the CPU kernel
  float* row_fac;
  float* col_rsqrt;
  float* col_fac;
  float* row_contrib;  // [kHidden, |r|]
  float* col_contrib;  // [kHidden, |c|]
  float* fold;         // [kHidden * kFeatures] w0s, [kHidden] b0t, [1] step scale
  float* partials;     // [chunks, kFeatures] sums of squares, per chunk
  const float* weights;  // this tensor's packed MLP
  const float* decays;   // this tensor's decays as P::decay reads them (or null)
  float* step;           // small_fc_lopt's step counter (incremented by the fold), or null
  const float* lr_mult;  // VeLO's lr_mult of this tensor, or null
  int64_t numel;
  int64_t chunks;
  FactoredGeometry geo;
  int factored;
};

struct Table {
  TensorArgs t[kMaxTensors];
  int64_t start[kMaxTensors + 1];  // prefix sums of the work items (blocks or threads) per tensor
  int count;
};
// Kernel parameters are limited to 4 KB before CUDA 12.1; the kernels add a few pointers.
static_assert(sizeof(Table) <= 4096 - 64, "the tensor table must fit the kernel parameter space");

// The tensor of work item `item` (start[i] <= item < start[i + 1]) in a table of any kind.
template <typename Tab>
__device__ __forceinline__ int find_tensor(const Tab& table, int64_t item) {
  int lo = 0, hi = table.count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table.start[mid] <= item)
      lo = mid;
    else
      hi = mid - 1;
  }
  return lo;
}

__device__ __forceinline__ bool skipped(const bool* skip) { return skip != nullptr && *skip; }

// Sum over the block of one float per thread, in a fixed order (warp shuffles, then the warps
// in order). The result is valid in thread 0. `scratch` holds kThreads / 32 floats.
template <typename T>
__device__ T block_sum(T x, T* scratch) {
  for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  __syncthreads();
  if (lane == 0) scratch[warp] = x;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0)
    for (int w = 0; w < kThreads / 32; ++w) total += scratch[w];
  return total;
}

// -- pass 1: factored second moments -----------------------------------------------------------

// The [O, R, I] view of a reduction over P (drop-P output) or over Q (drop-Q output).
struct ReduceView {
  int64_t O, R, I;
};
LO_HD ReduceView over_p(const FactoredGeometry& g) { return {g.A, g.P, g.B * g.Q * g.C}; }
LO_HD ReduceView over_q(const FactoredGeometry& g) { return {g.A * g.P * g.B, g.Q, g.C}; }
// Side 0 is r (the mean over d0), side 1 is c (the mean over d1).
LO_HD ReduceView side_view(const FactoredGeometry& g, int side) {
  return (side == 0) == static_cast<bool>(g.d0_is_p) ? over_p(g) : over_q(g);
}
LO_HD int64_t side_size(const FactoredGeometry& g, int side) {
  return side == 0 ? g.row_numel() : g.col_numel();
}
// The outputs of a factored tensor that a launch of one kind handles: a side whose reduced
// axis is the innermost (I == 1) goes to the warp-per-output kernel, the others to the
// thread-per-output kernel.
LO_HD int64_t moment_outputs(const FactoredGeometry& g, bool warp_per_output) {
  int64_t n = 0;
  for (int side = 0; side < 2; ++side)
    if ((side_view(g, side).I == 1) == warp_per_output) n += side_size(g, side);
  return n;
}

// Updates r or c (side) at output idx with the mean of g^2, and the scratch derived from it.
template <class P>
__device__ __forceinline__ void store_moment(const TensorArgs& t, int side, int64_t idx,
                                             float mean) {
  const int64_t size = side_size(t.geo, side);
  float* state = side == 0 ? t.row : t.col;
  for (int k = 0; k < kFactoredChannels; ++k) {
    float& s = state[k * size + idx];
    s = ema(s, mean, clip01(P::decay(t.decays, kDecayFactored + k)));
    if (side == 0) {
      t.row_rsqrt[k * size + idx] = accumulator_rsqrt(s);
    } else {
      t.col_rsqrt[k * size + idx] = accumulator_rsqrt(s);
      t.col_fac[k * size + idx] = col_factor(s);
    }
  }
}

// Means of g^2 for the outputs of r and c, summed in double in a fixed order. kWarp: one warp
// per output of a side reduced along the innermost axis (coalesced row reads, then a fixed
// shuffle tree); otherwise one thread per output (neighbouring threads read neighbouring
// addresses at every step of the reduced axis).
template <class P, typename S, bool kWarp>
__global__ void __launch_bounds__(kThreads) factored_moments_kernel(Table table,
                                                                    const bool* skip) {
  if (skipped(skip)) return;
  const int64_t thread = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  const int64_t item = kWarp ? thread / 32 : thread;
  if (item >= table.start[table.count]) return;  // whole warps leave together
  const int ti = find_tensor(table, item);
  const TensorArgs& t = table.t[ti];
  int64_t idx = item - table.start[ti];
  int side = 0;
  const int64_t first = (side_view(t.geo, 0).I == 1) == kWarp ? side_size(t.geo, 0) : 0;
  if (idx >= first) {
    side = 1;
    idx -= first;
  }
  const ReduceView view = side_view(t.geo, side);
  const int64_t o = idx / view.I, i = idx % view.I;
  const S* g = static_cast<const S*>(t.g);
  double sum = 0.0;
  if (kWarp) {
    const int lane = threadIdx.x % 32;
    for (int64_t r = lane; r < view.R; r += 32)
      sum += static_cast<double>(factored_gsq(P::grad(to_float(g[o * view.R + r]))));
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane != 0) return;
  } else {
    for (int64_t r = 0; r < view.R; ++r)
      sum += static_cast<double>(factored_gsq(P::grad(to_float(g[(o * view.R + r) * view.I + i]))));
  }
  store_moment<P>(t, side, idx, static_cast<float>(sum / static_cast<double>(view.R)));
}

// One thread per row of r along its copy of d1 (items: |r| / size(d1) per tensor).
__global__ void __launch_bounds__(kThreads) row_factor_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  const int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= table.start[table.count]) return;
  const int ti = find_tensor(table, item);
  const TensorArgs& t = table.t[ti];
  const int64_t idx = item - table.start[ti];
  const FactoredGeometry& g = t.geo;
  // r is [A, B, Q, C] (d0 = P; d1 = Q: view [A*B, Q, C]) or [A, P, B, C] (view [A, P, B*C]).
  const ReduceView view = g.d0_is_p ? ReduceView{g.A * g.B, g.Q, g.C} : ReduceView{g.A, g.P, g.B * g.C};
  const int64_t o = idx / view.I, i = idx % view.I;
  const int64_t size = g.row_numel();
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float* r = t.row + k * size;
    double sum = 0.0;
    for (int64_t j = 0; j < view.R; ++j) sum += static_cast<double>(r[(o * view.R + j) * view.I + i]);
    const float mean = static_cast<float>(sum / static_cast<double>(view.R));
    for (int64_t j = 0; j < view.R; ++j) {
      const int64_t e = (o * view.R + j) * view.I + i;
      t.row_fac[k * size + e] = row_factor(r[e], mean);
    }
  }
}

// -- passes 2 and 4: per element ------------------------------------------------------------------

// Where element e of a factored tensor reads r (ri) and c (ci). 32-bit divisions when the
// tensor allows (64-bit integer division is many times slower on a GPU).
__device__ __forceinline__ void factored_indices(const FactoredGeometry& g, int64_t e,
                                                 int64_t& ri, int64_t& ci) {
  if (g.numel() <= INT32_MAX) {
    const uint32_t C = static_cast<uint32_t>(g.C), Q = static_cast<uint32_t>(g.Q);
    const uint32_t B = static_cast<uint32_t>(g.B), Pn = static_cast<uint32_t>(g.P);
    uint32_t f = static_cast<uint32_t>(e);
    const uint32_t c = f % C;
    f /= C;
    const uint32_t q = f % Q;
    f /= Q;
    const uint32_t b = f % B;
    f /= B;
    const uint32_t p = f % Pn;
    const uint32_t a = f / Pn;
    const uint32_t drop_p = ((a * B + b) * Q + q) * C + c;
    const uint32_t drop_q = ((a * Pn + p) * B + b) * C + c;
    ri = g.d0_is_p ? drop_p : drop_q;
    ci = g.d0_is_p ? drop_q : drop_p;
    return;
  }
  const FactoredCursor cur(g, e);
  ri = cur.row_index();
  ci = cur.col_index();
}

// The inputs of element e (state updated in place when `update_state`); for a factored tensor
// also where it reads r (ri) and c (ci).
template <class P, typename S, bool update_state>
__device__ __forceinline__ void element_inputs(const TensorArgs& t, int64_t e,
                                               ElementInputs<float>& in, int64_t& ri,
                                               int64_t& ci) {
  const int64_t n = t.numel;
  in.g = P::grad(to_float(static_cast<const S*>(t.g)[e]));
  in.p = to_float(static_cast<const S*>(t.p)[e]);
  for (int k = 0; k < kMomentumChannels; ++k) {
    float m = t.m[k * n + e];
    if (update_state) {
      m = ema(m, in.g, P::decay(t.decays, kDecayMomentum + k));
      t.m[k * n + e] = m;
    }
    in.m[k] = m;
  }
  float v = t.v[e];
  if (update_state) {
    v = ema(v, in.g * in.g, clip01(P::decay(t.decays, kDecayRms)));
    t.v[e] = v;
  }
  in.v = v;
  if (t.factored) {
    factored_indices(t.geo, e, ri, ci);
    const int64_t rs = t.geo.row_numel(), cs = t.geo.col_numel();
    float rf[kFactoredChannels], cf[kFactoredChannels];
    for (int k = 0; k < kFactoredChannels; ++k) {
      rf[k] = t.row_fac[k * rs + ri];
      cf[k] = t.col_fac[k * cs + ci];
    }
    set_factored_factors(in, rf, cf);
  } else {
    float u[kFactoredChannels];
    for (int k = 0; k < kFactoredChannels; ++k) {
      float x = t.row[k * n + e];
      if (update_state) {
        x = ema(x, factored_gsq(in.g), clip01(P::decay(t.decays, kDecayFactored + k)));
        t.row[k * n + e] = x;
      }
      u[k] = x;
    }
    set_unfactored(in, u, P::kUnfactoredMomentumEps);
  }
}

// One block per chunk: accumulators, then the chunk's sums of squares of the features (all
// kFeatures channels for an unfactored tensor, the element-wise ones for a factored tensor).
template <class P, typename S>
__global__ void __launch_bounds__(kThreads) accumulate_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  __shared__ float scratch[kThreads / 32];
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  const int64_t chunk = blockIdx.x - table.start[ti];
  const int64_t e0 = chunk * kChunk;
  float sq[P::kFeatures];
  for (int c = 0; c < P::kFeatures; ++c) sq[c] = 0.f;
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = e0 + k * kThreads + threadIdx.x;
    if (e >= t.numel) break;
    ElementInputs<float> in;
    int64_t ri = 0, ci = 0;
    element_inputs<P, S, true>(t, e, in, ri, ci);
    if (t.factored) {
      float x[P::kElementFeatures];
      P::element_features(in, x);
      for (int c = 0; c < P::kElementFeatures; ++c) sq[P::element_channel(c)] += x[c] * x[c];
    } else {
      float x[P::kFeatures];
      P::features(in, x);
      for (int c = 0; c < P::kFeatures; ++c) sq[c] += x[c] * x[c];
    }
  }
  for (int c = 0; c < P::kFeatures; ++c) {
    const float total = block_sum(sq[c], scratch);
    if (threadIdx.x == 0) t.partials[chunk * P::kFeatures + c] = total;
  }
}

// One block per tensor: normalisation scales and P's constants folded into the first layer.
template <class P>
__global__ void __launch_bounds__(kThreads) fold_kernel(Table table, float step_mult,
                                                        const bool* skip) {
  if (skipped(skip)) return;
  constexpr int F = P::kFeatures;
  constexpr int H = P::kHidden;
  __shared__ double dscratch[kThreads / 32];
  __shared__ double sums[F];
  __shared__ float ws[H][F];
  const TensorArgs& t = table.t[blockIdx.x];
  if (t.numel == 0) {  // nothing to fold; the step is still counted
    if (threadIdx.x == 0 && t.step != nullptr) *t.step += 1.0f;
    return;
  }
  if (threadIdx.x < F) {
    double s = 0.0;
    for (int64_t c = 0; c < t.chunks; ++c) s += t.partials[c * F + threadIdx.x];
    sums[threadIdx.x] = s;
  }
  const int64_t rs = t.factored ? t.geo.row_numel() : 0, cs = t.factored ? t.geo.col_numel() : 0;
  if (t.factored) {
    // Row/column channels: each r value stands for size(d0) elements, each c for size(d1).
    const double d0_len = static_cast<double>(t.geo.d0_is_p ? t.geo.P : t.geo.Q);
    const double d1_len = static_cast<double>(t.geo.d0_is_p ? t.geo.Q : t.geo.P);
    for (int side = 0; side < 2; ++side) {
      const float* values = side == 0 ? t.row : t.col;
      const float* rsq = side == 0 ? t.row_rsqrt : t.col_rsqrt;
      const int64_t size = side == 0 ? rs : cs;
      const int first = side == 0 ? P::kFirstRowChannel : P::kFirstColChannel;
      const double len = side == 0 ? d0_len : d1_len;
      for (int k = 0; k < kFactoredChannels; ++k) {
        double a = 0.0, b = 0.0;
        for (int64_t i = threadIdx.x; i < size; i += kThreads) {
          const double x = values[k * size + i], y = rsq[k * size + i];
          a += x * x;
          b += y * y;
        }
        a = block_sum(a, dscratch);
        b = block_sum(b, dscratch);
        if (threadIdx.x == 0) {
          sums[first + k] = len * a;
          sums[first + 2 * kFactoredChannels + k] = len * b;
        }
      }
    }
  }
  __syncthreads();
  // Scaled first-layer weights, [H][F].
  for (int idx = threadIdx.x; idx < H * F; idx += kThreads) {
    const int j = idx / F, c = idx % F;
    ws[j][c] = t.weights[P::kW0 + j * P::kInputs + c] * normalisation_scale(sums[c], t.numel);
  }
  __syncthreads();
  float* w0s = t.fold;
  float* b0t = t.fold + H * F;
  const float step_t = t.step != nullptr ? *t.step : 0.f;
  if (t.factored) {
    for (int idx = threadIdx.x; idx < H * P::kElementFeatures; idx += kThreads) {
      const int j = idx / P::kElementFeatures, i = idx % P::kElementFeatures;
      w0s[idx] = ws[j][P::element_channel(i)];
    }
    // Per-row and per-column first-layer terms of the accumulator channels.
    for (int side = 0; side < 2; ++side) {
      const float* values = side == 0 ? t.row : t.col;
      const float* rsq = side == 0 ? t.row_rsqrt : t.col_rsqrt;
      float* out = side == 0 ? t.row_contrib : t.col_contrib;
      const int64_t size = side == 0 ? rs : cs;
      const int first = side == 0 ? P::kFirstRowChannel : P::kFirstColChannel;
      for (int64_t idx = threadIdx.x; idx < H * size; idx += kThreads) {
        const int j = static_cast<int>(idx / size);
        const int64_t i = idx % size;
        float acc = 0.f;
        for (int k = 0; k < kFactoredChannels; ++k) {
          acc += ws[j][first + k] * values[k * size + i];
          acc += ws[j][first + 2 * kFactoredChannels + k] * rsq[k * size + i];
        }
        out[idx] = acc;
      }
    }
  } else {
    for (int idx = threadIdx.x; idx < H * F; idx += kThreads) w0s[idx] = ws[idx / F][idx % F];
  }
  if (threadIdx.x < H) b0t[threadIdx.x] = P::first_bias(t.weights, step_t, threadIdx.x);
  if (threadIdx.x == 0) {
    const float lr_mult = t.lr_mult != nullptr ? *t.lr_mult : 1.f;
    b0t[H] = P::step_scale(lr_mult, sums[P::kParamChannel], t.numel, step_mult);
  }
  __syncthreads();
  if (threadIdx.x == 0 && t.step != nullptr) *t.step = step_t + 1.0f;
}

// One block per chunk: features, MLP and update; the tensor's folded first layer and the
// other layers are staged in shared memory.
template <class P, typename S>
__global__ void __launch_bounds__(kThreads) update_kernel(Table table, const float* lr,
                                                          float weight_decay, float exp_mult,
                                                          const bool* skip) {
  if (skipped(skip)) return;
  constexpr int F = P::kFeatures;
  constexpr int H = P::kHidden;
  __shared__ float w0s[H * F];
  __shared__ float b0t[H + 1];
  __shared__ float w1[H * H];
  __shared__ float b1[H];
  __shared__ float w2[2 * H];
  __shared__ float b2[2];
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  const int64_t chunk = blockIdx.x - table.start[ti];
  for (int i = threadIdx.x; i < H * F; i += kThreads) w0s[i] = t.fold[i];
  for (int i = threadIdx.x; i <= H; i += kThreads) b0t[i] = t.fold[H * F + i];
  for (int i = threadIdx.x; i < H * H; i += kThreads) w1[i] = t.weights[P::kW1 + i];
  for (int i = threadIdx.x; i < H; i += kThreads) b1[i] = t.weights[P::kB1 + i];
  for (int i = threadIdx.x; i < 2 * H; i += kThreads) w2[i] = t.weights[P::kW2 + i];
  if (threadIdx.x < 2) b2[threadIdx.x] = t.weights[P::kB2 + threadIdx.x];
  __syncthreads();
  const float lr_value = *lr;
  const float scale = b0t[H];
  const int64_t rs = t.factored ? t.geo.row_numel() : 0, cs = t.factored ? t.geo.col_numel() : 0;
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = chunk * kChunk + k * kThreads + threadIdx.x;
    if (e >= t.numel) break;
    ElementInputs<float> in;
    int64_t ri = 0, ci = 0;
    element_inputs<P, S, false>(t, e, in, ri, ci);
    float direction, magnitude;
    if (t.factored) {
      float x[P::kElementFeatures];
      P::element_features(in, x);
      float b0[H];
      for (int j = 0; j < H; ++j) b0[j] = (b0t[j] + t.row_contrib[j * rs + ri]) + t.col_contrib[j * cs + ci];
      mlp_forward<P::kElementFeatures, H>(x, w0s, b0, w1, b1, w2, b2, direction, magnitude);
    } else {
      float x[F];
      P::features(in, x);
      mlp_forward<F, H>(x, w0s, b0t, w1, b1, w2, b2, direction, magnitude);
    }
    const float step = step_from_outputs(direction, magnitude, exp_mult, scale);
    static_cast<S*>(t.p)[e] = from_float<S>(apply_step(in.p, step, lr_value, weight_decay));
  }
}

}  // namespace cuda
}  // namespace lo_ops
