// CUDA kernels shared by small_fc_lopt_step_ and velo_step_: plain CUDA on raw pointers (no
// torch headers), the optimizer-specific parts from a policy P (small_fc_lopt::Policy,
// velo::Policy), the per-element maths from the shared headers. The passes mirror the CPU
// kernel (cpu/adafactor_mlp_cpu.h):
//   1. factored tensors: means of g^2 over d0 and d1 update r and c, in two levels: blocks sum
//      segments of the reduced axis for a tile of outputs (moment_partials_kernel), then one
//      thread per output adds its segments in order (moment_combine_kernel); then a block per
//      slice of r along d1 computes the row factors (row_factor_kernel);
//   2. one block per chunk of kChunk elements: momentum, rms and diagonal accumulators are
//      updated and each chunk's sums of squares of the features are written out;
//   3. one block per tensor folds the normalisation scales and P's constant inputs into the
//      first layer (fold_kernel), then, for a factored tensor, one thread per row and column
//      turns its accumulator channels into first-layer terms (contrib_kernel);
//   4. one block per chunk: features, the MLP (one element per thread) and the update.
// The phase ops (shards of larger tensors) run the same passes split at the sums over whole
// tensors: phase 1 is pass 1's reductions with the sums written out (moment_combine_kernel with
// gsq_row/gsq_col set), phase 2 the means and updates of r and c from complete sums
// (factored_from_sums_kernel) and the sums of r over d1 (row_sums_kernel), phase 3 the scratch
// of pass 1 (scratch_kernel), pass 2 and the feature sums (feature_sums_kernel), phase 4 the
// scratch again and passes 3 and 4 from the complete feature sums.
// Every reduction is a fixed-order tree or loop (no atomics), so results do not depend on
// scheduling. Tensors reach the kernels through tables passed by value (kMaxTensors per launch;
// the host launches again while tensors remain). Values that change every step (lr, the step
// count, VeLO's lr_mult and skip flag) are read from device memory, so a captured graph replays.
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
constexpr int kWarps = kThreads / 32;
constexpr int kElementsPerThread = 8;
constexpr int64_t kChunk = kThreads * kElementsPerThread;  // elements per block
// Elements a block of moment_partials_kernel reads (a tile of outputs times a segment of the
// reduced axis).
constexpr int64_t kReduceElements = 16384;

// Bytes of kernel parameters: 32764 from CUDA 12.1 on (Volta and newer), 4096 before. The
// tensor tables are sized to fill them, leaving room for a kernel's other parameters.
#ifndef LO_OPS_KERNEL_PARAM_BYTES
#if CUDART_VERSION >= 12010
#define LO_OPS_KERNEL_PARAM_BYTES 32764
#else
#define LO_OPS_KERNEL_PARAM_BYTES 4096
#endif
#endif
constexpr int64_t kKernelParamBytes = LO_OPS_KERNEL_PARAM_BYTES;
constexpr int64_t kOtherParamBytes = 64;

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
  double* moment_partials;  // [|r|, segments of r] then [|c|, segments of c] (MomentPlan)
  float* fold;         // [kHidden * kFeatures] scaled W0, [kHidden] b0t, [1] step scale
  float* partials;     // [chunks, kFeatures] sums of squares, per chunk
  const float* weights;  // this tensor's packed MLP
  const float* decays;   // this tensor's decays as P::decay reads them (or null)
  float* step;           // small_fc_lopt's step counter (incremented by the fold), or null
  const float* lr_mult;  // VeLO's lr_mult of this tensor, or null
  // The phase ops (the tensor may be a shard of a larger one; see lo_ops.cpp), null for the
  // one-call ops: sums of g^2 over d0 (|r|) and over d1 (|c|), out of phase 1 and into phase 2;
  // sums of r over its copy of d1 ([3, |r| / size(d1)]), out of phase 2 and into phases 3 and 4;
  // feature sums of squares ([kFeatures]), out of phase 3 and into phase 4.
  double* gsq_row;
  double* gsq_col;
  double* row_sums;
  double* feature_sums;
  int64_t numel;
  int64_t chunks;
  int64_t total_numel;         // the whole tensor's element count (numel unless a shard)
  int64_t d0_total, d1_total;  // the whole tensor's sizes of d0 and d1
  FactoredGeometry geo;
  float grad_clip;  // > 0: gradients also clipped to [-grad_clip, grad_clip] (phase 1)
  float scale = 1.f;    // small_fc_lopt's step multiplier (μLO's s, spec 6.1), 1 otherwise
  int nan_to_num = 0;   // gradients through nan_to_num first (μLO)
  int factored;
};

// Tensors per launch table whose entries take `entry` bytes (plus their prefix sum).
constexpr int table_capacity(int64_t entry) {
  return static_cast<int>((kKernelParamBytes - kOtherParamBytes - 16) / (entry + 8));
}
constexpr int kMaxTensors = table_capacity(sizeof(TensorArgs));

struct Table {
  TensorArgs t[kMaxTensors];
  int64_t start[kMaxTensors + 1];  // prefix sums of the work items (blocks or threads) per tensor
  int count;
};
static_assert(sizeof(Table) <= kKernelParamBytes - kOtherParamBytes,
              "the tensor table must fit the kernel parameter space");

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

// How moment_partials_kernel cuts one side's reduction: a block takes a tile of outputs and a
// segment of the reduced axis. When the reduced axis is the innermost (I == 1) a warp reads one
// output's row (8 outputs a block); otherwise the 32 lanes take 32 consecutive outputs and the
// 8 warps every 8th element of the segment. Segments hold about kReduceElements per block.
struct MomentPlan {
  ReduceView view;
  int64_t outputs;   // O * I
  int64_t tile;      // outputs per block
  int64_t rows;      // elements of the reduced axis per segment
  int64_t segments;  // per output
  LO_HD int64_t tiles() const { return (outputs + tile - 1) / tile; }
  LO_HD int64_t blocks() const { return tiles() * segments; }
};
LO_HD MomentPlan moment_plan(const FactoredGeometry& g, int side) {
  MomentPlan plan;
  plan.view = side_view(g, side);
  plan.outputs = plan.view.O * plan.view.I;
  plan.tile = plan.view.I == 1 ? kWarps : 32;
  plan.rows = kReduceElements / plan.tile;
  plan.segments = (plan.view.R + plan.rows - 1) / plan.rows;
  return plan;
}
// Blocks of moment_partials_kernel for a factored tensor (both sides).
LO_HD int64_t moment_blocks(const FactoredGeometry& g) {
  return moment_plan(g, 0).blocks() + moment_plan(g, 1).blocks();
}
// Doubles of moment_partials scratch for a factored tensor.
LO_HD int64_t moment_partials_size(const FactoredGeometry& g) {
  const MomentPlan r = moment_plan(g, 0), c = moment_plan(g, 1);
  return r.outputs * r.segments + c.outputs * c.segments;
}

// P's gradient, clipped further when the tensor asks for it (the phase ops' grad_clip).
template <class P>
__device__ __forceinline__ float clipped_grad(const TensorArgs& t, float g) {
  const float x = P::grad(t.nan_to_num ? nan_to_num(g) : g);
  return t.grad_clip > 0.f ? clip(x, -t.grad_clip, t.grad_clip) : x;
}

// Sums of g^2 over one segment of the reduced axis for one tile of outputs, in double, in a
// fixed order: the segment's elements in order per lane (or warp), then a fixed shuffle tree
// (rows) or the 8 warps in order (columns). With `found`, a block that reads a NaN or an
// infinity sets *found (the gradients' non-finite check, fused into this read of them).
template <class P, typename S>
__global__ void __launch_bounds__(kThreads) moment_partials_kernel(Table table, const bool* skip,
                                                                   bool* found) {
  if (skipped(skip)) return;
  __shared__ double part[kThreads];
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  int64_t b = blockIdx.x - table.start[ti];
  MomentPlan plan = moment_plan(t.geo, 0);
  double* out = t.moment_partials;
  if (b >= plan.blocks()) {
    b -= plan.blocks();
    out += plan.outputs * plan.segments;
    plan = moment_plan(t.geo, 1);
  }
  const int64_t tile = b / plan.segments, segment = b % plan.segments;
  const int64_t r0 = segment * plan.rows;
  const int64_t r1 = r0 + plan.rows < plan.view.R ? r0 + plan.rows : plan.view.R;
  const int64_t R = plan.view.R, I = plan.view.I;
  const S* g = static_cast<const S*>(t.g);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  double sum = 0.0;
  bool bad = false;
  if (I == 1) {
    const int64_t o = tile * plan.tile + warp;
    if (o < plan.outputs)
      for (int64_t r = r0 + lane; r < r1; r += 32) {
        const float x = to_float(g[o * R + r]);
        bad = bad || !isfinite(x);
        sum += static_cast<double>(factored_gsq(clipped_grad<P>(t, x)));
      }
    for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_down_sync(0xffffffffu, sum, offset);
    if (lane == 0 && o < plan.outputs) out[o * plan.segments + segment] = sum;
  } else {
    const int64_t idx = tile * plan.tile + lane;
    if (idx < plan.outputs) {
      const int64_t o = idx / I, i = idx % I;
      for (int64_t r = r0 + warp; r < r1; r += kWarps) {
        const float x = to_float(g[(o * R + r) * I + i]);
        bad = bad || !isfinite(x);
        sum += static_cast<double>(factored_gsq(clipped_grad<P>(t, x)));
      }
    }
    part[threadIdx.x] = sum;
    __syncthreads();
    if (warp == 0 && idx < plan.outputs) {
      double total = 0.0;
      for (int w = 0; w < kWarps; ++w) total += part[w * 32 + lane];
      out[idx * plan.segments + segment] = total;
    }
  }
  if (found != nullptr && __syncthreads_or(bad) && threadIdx.x == 0) *found = true;
}

// The non-finite check of the gradients moment_partials_kernel does not read (unfactored
// tensors): one block per chunk sets *found when its chunk holds a NaN or an infinity.
template <typename S>
__global__ void __launch_bounds__(kThreads) nonfinite_kernel(Table table, bool* found) {
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  const int64_t e0 = (blockIdx.x - table.start[ti]) * kChunk;
  const S* g = static_cast<const S*>(t.g);
  bool bad = false;
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = e0 + k * kThreads + threadIdx.x;
    if (e < t.numel) bad = bad || !isfinite(to_float(g[e]));
  }
  if (__syncthreads_or(bad) && threadIdx.x == 0) *found = true;
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

// One thread per output of r and c (items: |r| + |c| per factored tensor): its segments' sums
// in order, the mean, and the accumulator update.
template <class P>
__global__ void __launch_bounds__(kThreads) moment_combine_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  const int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= table.start[table.count]) return;
  const int ti = find_tensor(table, item);
  const TensorArgs& t = table.t[ti];
  int64_t idx = item - table.start[ti];
  int side = 0;
  MomentPlan plan = moment_plan(t.geo, 0);
  const double* in = t.moment_partials;
  if (idx >= plan.outputs) {
    idx -= plan.outputs;
    in += plan.outputs * plan.segments;
    side = 1;
    plan = moment_plan(t.geo, 1);
  }
  double sum = 0.0;
  for (int64_t s = 0; s < plan.segments; ++s) sum += in[idx * plan.segments + s];
  if (t.gsq_row != nullptr) {  // phase 1: the sums go out
    (side == 0 ? t.gsq_row : t.gsq_col)[idx] = sum;
    return;
  }
  store_moment<P>(t, side, idx, static_cast<float>(sum / static_cast<double>(plan.view.R)));
}

// Phase 2: one thread per output of r and c (items: |r| + |c|): the mean of g^2 from the
// complete sums over the whole tensor's d0 / d1, and the accumulator update.
template <class P>
__global__ void __launch_bounds__(kThreads) factored_from_sums_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  const int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= table.start[table.count]) return;
  const int ti = find_tensor(table, item);
  const TensorArgs& t = table.t[ti];
  int64_t idx = item - table.start[ti];
  const int64_t rs = t.geo.row_numel();
  const int side = idx < rs ? 0 : 1;
  if (side == 1) idx -= rs;
  const double sum = (side == 0 ? t.gsq_row : t.gsq_col)[idx];
  const double count = static_cast<double>(side == 0 ? t.d0_total : t.d1_total);
  const float mean = static_cast<float>(sum / count);
  const int64_t size = side_size(t.geo, side);
  float* state = side == 0 ? t.row : t.col;
  for (int k = 0; k < kFactoredChannels; ++k) {
    float& x = state[k * size + idx];
    x = ema(x, mean, clip01(P::decay(t.decays, kDecayFactored + k)));
  }
}

// r as [slices of d1 within r]: d0 = P: r is [A, B, Q, C], d1 = Q, view [A*B, Q, C]; d0 = Q: r
// is [A, P, B, C], d1 = P, view [A, P, B*C]. A slice is one (o, i) of the view.
LO_HD ReduceView row_slices(const FactoredGeometry& g) {
  return g.d0_is_p ? ReduceView{g.A * g.B, g.Q, g.C} : ReduceView{g.A, g.P, g.B * g.C};
}

// One block per slice of r along d1 (items: |r| / size(d1) per tensor): the slice's mean by a
// fixed-order block reduction, then the row factors of the slice.
__global__ void __launch_bounds__(kThreads) row_factor_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  __shared__ double scratch[kWarps];
  __shared__ float mean;
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  const int64_t slice = blockIdx.x - table.start[ti];
  const ReduceView view = row_slices(t.geo);
  const int64_t o = slice / view.I, i = slice % view.I;
  const int64_t size = t.geo.row_numel();
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float* r = t.row + k * size;
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < view.R; j += kThreads) sum += static_cast<double>(r[(o * view.R + j) * view.I + i]);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) mean = static_cast<float>(sum / static_cast<double>(view.R));
    __syncthreads();
    for (int64_t j = threadIdx.x; j < view.R; j += kThreads) {
      const int64_t e = (o * view.R + j) * view.I + i;
      t.row_fac[k * size + e] = row_factor(r[e], mean);
    }
    __syncthreads();  // `mean` is rewritten for the next channel
  }
}

// Phase 2: one block per slice of r along d1 (as row_factor_kernel): the slice's sums, out to
// row_sums[k * slices + slice].
__global__ void __launch_bounds__(kThreads) row_sums_kernel(Table table) {
  __shared__ double scratch[kWarps];
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  const int64_t slice = blockIdx.x - table.start[ti];
  const ReduceView view = row_slices(t.geo);
  const int64_t o = slice / view.I, i = slice % view.I;
  const int64_t size = t.geo.row_numel(), slices = view.O * view.I;
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float* r = t.row + k * size;
    double sum = 0.0;
    for (int64_t j = threadIdx.x; j < view.R; j += kThreads) sum += static_cast<double>(r[(o * view.R + j) * view.I + i]);
    sum = block_sum(sum, scratch);
    if (threadIdx.x == 0) t.row_sums[k * slices + slice] = sum;
  }
}

// Phases 3 and 4: one thread per index of r, then of c (items: |r| + |c|): the scratch of
// pass 1 from the updated r and c and the complete row sums (means over the whole size of d1).
__global__ void __launch_bounds__(kThreads) scratch_kernel(Table table) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= table.start[table.count]) return;
  const int ti = find_tensor(table, item);
  const TensorArgs& t = table.t[ti];
  int64_t i = item - table.start[ti];
  const int64_t rs = t.geo.row_numel(), cs = t.geo.col_numel();
  if (i < rs) {
    const int64_t pq = t.geo.drop_pq_numel(), j = row_sum_index(t.geo, i);
    const double d1_len = static_cast<double>(t.d1_total);
    for (int k = 0; k < kFactoredChannels; ++k) {
      const float r = t.row[k * rs + i];
      t.row_rsqrt[k * rs + i] = accumulator_rsqrt(r);
      t.row_fac[k * rs + i] = row_factor(r, static_cast<float>(t.row_sums[k * pq + j] / d1_len));
    }
    return;
  }
  i -= rs;
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float c = t.col[k * cs + i];
    t.col_rsqrt[k * cs + i] = accumulator_rsqrt(c);
    t.col_fac[k * cs + i] = col_factor(c);
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
  const float g = to_float(static_cast<const S*>(t.g)[e]);
  in.g = P::grad(t.nan_to_num ? nan_to_num(g) : g);
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

// The sums of squares of the F feature channels over the tensor (a shard: over its own
// elements), into `sums` (shared, valid after a barrier): the element-wise channels (all of
// them for an unfactored tensor) from the chunks' partials, each thread a stride of chunks, then
// a fixed-order block reduction per channel; a factored tensor's row/column channels from r and
// c, each r value standing for the tensor's length along d0, each c value for its length
// along d1.
template <class P>
__device__ void tensor_feature_sums(const TensorArgs& t, double* sums, double* dscratch) {
  constexpr int F = P::kFeatures;
  {
    double acc[F];
    for (int c = 0; c < F; ++c) acc[c] = 0.0;
    for (int64_t chunk = threadIdx.x; chunk < t.chunks; chunk += kThreads)
      for (int c = 0; c < F; ++c) acc[c] += t.partials[chunk * F + c];
    for (int c = 0; c < F; ++c) {
      const double total = block_sum(acc[c], dscratch);
      if (threadIdx.x == 0) sums[c] = total;
    }
  }
  if (t.factored) {
    const double d0_len = static_cast<double>(t.geo.d0_is_p ? t.geo.P : t.geo.Q);
    const double d1_len = static_cast<double>(t.geo.d0_is_p ? t.geo.Q : t.geo.P);
    for (int side = 0; side < 2; ++side) {
      const float* values = side == 0 ? t.row : t.col;
      const float* rsq = side == 0 ? t.row_rsqrt : t.col_rsqrt;
      const int64_t size = side_size(t.geo, side);
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
}

// Phase 3: one block per tensor: its feature sums, out to feature_sums (zeros for a shard of
// no elements; left as they are when skip).
template <class P>
__global__ void __launch_bounds__(kThreads) feature_sums_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  __shared__ double dscratch[kWarps];
  __shared__ double sums[P::kFeatures];
  const TensorArgs& t = table.t[blockIdx.x];
  if (t.numel == 0) {
    if (threadIdx.x < P::kFeatures) t.feature_sums[threadIdx.x] = 0.0;
    return;
  }
  tensor_feature_sums<P>(t, sums, dscratch);
  __syncthreads();
  if (threadIdx.x < P::kFeatures) t.feature_sums[threadIdx.x] = sums[threadIdx.x];
}

// One block per tensor: normalisation scales and P's constants folded into the first layer,
// from the tensor's feature sums (tensor_feature_sums), or for phase 4 from the complete sums
// over the whole tensor (feature_sums), with the whole tensor's element count.
template <class P>
__global__ void __launch_bounds__(kThreads) fold_kernel(Table table, float step_mult,
                                                        const bool* skip) {
  if (skipped(skip)) return;
  constexpr int F = P::kFeatures;
  constexpr int H = P::kHidden;
  __shared__ double dscratch[kWarps];
  __shared__ double sums[F];
  const TensorArgs& t = table.t[blockIdx.x];
  if (t.numel == 0) {  // nothing to fold; the step is still counted
    if (threadIdx.x == 0 && t.step != nullptr) *t.step += 1.0f;
    return;
  }
  if (t.feature_sums != nullptr) {
    for (int c = threadIdx.x; c < F; c += kThreads) sums[c] = t.feature_sums[c];
  } else {
    tensor_feature_sums<P>(t, sums, dscratch);
  }
  __syncthreads();
  // The scaled first-layer weights [H][F], b0 with P's constant inputs, and the step scale.
  float* ws = t.fold;
  float* b0t = t.fold + H * F;
  const float step_t = t.step != nullptr ? *t.step : 0.f;
  for (int idx = threadIdx.x; idx < H * F; idx += kThreads) {
    const int j = idx / F, c = idx % F;
    ws[idx] = t.weights[P::kW0 + j * P::kInputs + c] * normalisation_scale(sums[c], t.total_numel);
  }
  if (threadIdx.x < H) b0t[threadIdx.x] = P::first_bias(t.weights, step_t, threadIdx.x);
  if (threadIdx.x == 0) {
    const float lr_mult = (t.lr_mult != nullptr ? *t.lr_mult : 1.f) * t.scale;
    b0t[H] = P::step_scale(lr_mult, sums[P::kParamChannel], t.total_numel, step_mult);
  }
  __syncthreads();
  if (threadIdx.x == 0 && t.step != nullptr) *t.step = step_t + 1.0f;
}

// Blocks of contrib_kernel for a factored tensor: one thread per index of r and of c.
LO_HD int64_t contrib_blocks(const FactoredGeometry& g) {
  return (g.row_numel() + g.col_numel() + kThreads - 1) / kThreads;
}

// A factored tensor's per-row and per-column first-layer terms of its accumulator channels
// (r, c and their rsqrt, constant along d0 or d1): one thread per index of r, then of c, each
// writing its H terms (items: contrib_blocks per factored tensor; a block serves one tensor).
template <class P>
__global__ void __launch_bounds__(kThreads) contrib_kernel(Table table, const bool* skip) {
  if (skipped(skip)) return;
  constexpr int F = P::kFeatures;
  constexpr int H = P::kHidden;
  __shared__ float ws[H * F];
  const int ti = find_tensor(table, blockIdx.x);
  const TensorArgs& t = table.t[ti];
  for (int i = threadIdx.x; i < H * F; i += kThreads) ws[i] = t.fold[i];
  __syncthreads();
  const int64_t rs = t.geo.row_numel(), cs = t.geo.col_numel();
  int64_t i = (blockIdx.x - table.start[ti]) * kThreads + threadIdx.x;
  if (i >= rs + cs) return;
  const int side = i < rs ? 0 : 1;
  if (side == 1) i -= rs;
  const float* values = side == 0 ? t.row : t.col;
  const float* rsq = side == 0 ? t.row_rsqrt : t.col_rsqrt;
  float* out = side == 0 ? t.row_contrib : t.col_contrib;
  const int64_t size = side == 0 ? rs : cs;
  const int first = side == 0 ? P::kFirstRowChannel : P::kFirstColChannel;
  float x[kFactoredChannels], y[kFactoredChannels];
  for (int k = 0; k < kFactoredChannels; ++k) {
    x[k] = values[k * size + i];
    y[k] = rsq[k * size + i];
  }
  for (int j = 0; j < H; ++j) {
    float acc = 0.f;
    for (int k = 0; k < kFactoredChannels; ++k) {
      acc += ws[j * F + first + k] * x[k];
      acc += ws[j * F + first + 2 * kFactoredChannels + k] * y[k];
    }
    out[j * size + i] = acc;
  }
}

// A compiler-only memory barrier (no instruction): at the top of update_kernel's element loop
// it keeps the compiler from hoisting the network's weights out of the loop into registers,
// where all of them would stay live across the elements (thousands of values, spilled to local
// memory); from shared memory they are read as each layer needs them.
__device__ __forceinline__ void reread_shared_memory() { asm volatile("" ::: "memory"); }

// One block per chunk: features, MLP and update; the tensor's folded first layer and the
// other layers are staged in shared memory. P::kUpdateBlocksPerSM sets the register budget
// (65536 / (kThreads * blocks) per thread), chosen so that the MLP's activations fit in
// registers with no stack frame.
template <class P, typename S>
__global__ void __launch_bounds__(kThreads, P::kUpdateBlocksPerSM) update_kernel(Table table, const float* lr,
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
  // The first layer: all F columns of the folded weights, or for a factored tensor the
  // element-wise ones ([H][kElementFeatures]); the others reach it through row/col_contrib.
  if (t.factored) {
    constexpr int E = P::kElementFeatures;
    for (int i = threadIdx.x; i < H * E; i += kThreads) w0s[i] = t.fold[(i / E) * F + P::element_channel(i % E)];
  } else {
    for (int i = threadIdx.x; i < H * F; i += kThreads) w0s[i] = t.fold[i];
  }
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
    reread_shared_memory();
    ElementInputs<float> in;
    int64_t ri = 0, ci = 0;
    element_inputs<P, S, false>(t, e, in, ri, ci);
    float direction, magnitude;
    if (t.factored) {
      float x[P::kElementFeatures];
      P::element_features(in, x);
      float b0[H];
      LO_UNROLL
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
