// CUDA kernels of lo_ops::velo_lstm_input (plain CUDA on raw pointers): one block per chunk of
// every tensor gathers the chunk's moments (sums, and squares about the chunk's own means) and
// whether its gradients are finite; one block per tensor combines its chunks into the tensor's
// row of X (fixed-order block reductions of velo::add_chunk_sums and velo::add_chunk_spreads,
// then velo::lstm_tensor_features); one block ANDs the per-tensor finite flags. No atomics:
// results do not depend on scheduling.
#pragma once

#include "../velo_math.h"
#include "adafactor_mlp.cuh"

namespace lo_ops {
namespace cuda {

struct StatsTensor {
  const void* p;
  const void* g;
  const float* m;  // [3, n]
  const float* v;  // [n]
  int64_t numel;
  int64_t first_chunk;  // into the bucket's ChunkMoments
  int64_t index;        // row of X
  int dims;             // axes longer than 1
};

constexpr int kMaxStatsTensors = table_capacity(sizeof(StatsTensor));

struct StatsTable {
  StatsTensor t[kMaxStatsTensors];
  int64_t start[kMaxStatsTensors + 1];
  int count;
};
static_assert(sizeof(StatsTable) <= kKernelParamBytes - kOtherParamBytes,
              "the tensor table must fit the kernel parameter space");

template <typename S>
__global__ void __launch_bounds__(kThreads) chunk_moments_kernel(StatsTable table,
                                                                 velo::ChunkMoments* out) {
  __shared__ double scratch[kThreads / 32];
  __shared__ float means[kMomentumChannels + 1];
  const int ti = find_tensor(table, blockIdx.x);
  const StatsTensor& t = table.t[ti];
  const int64_t chunk = blockIdx.x - table.start[ti];
  const int64_t e0 = chunk * kChunk;
  const int64_t n = t.numel;
  const int64_t left = n - e0;
  const double count = static_cast<double>(left < kChunk ? left : kChunk);
  double p_sq = 0.0, v_sum = 0.0, m_sum[kMomentumChannels] = {0.0, 0.0, 0.0};
  bool finite = true;
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = e0 + k * kThreads + threadIdx.x;
    if (e >= n) break;
    const float p = to_float(static_cast<const S*>(t.p)[e]);
    const float g = to_float(static_cast<const S*>(t.g)[e]);
    finite = finite && isfinite(g);
    p_sq += static_cast<double>(p * p);
    v_sum += t.v[e];
    for (int c = 0; c < kMomentumChannels; ++c) m_sum[c] += t.m[c * n + e];
  }
  velo::ChunkMoments mo;
  mo.p_sq = block_sum(p_sq, scratch);
  mo.v = block_sum(v_sum, scratch);
  for (int c = 0; c < kMomentumChannels; ++c) mo.m[c] = block_sum(m_sum[c], scratch);
  if (threadIdx.x == 0) {
    for (int c = 0; c < kMomentumChannels; ++c) means[c] = static_cast<float>(mo.m[c] / count);
    means[kMomentumChannels] = static_cast<float>(mo.v / count);
  }
  __syncthreads();
  double v_sq = 0.0, m_sq[kMomentumChannels] = {0.0, 0.0, 0.0};
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = e0 + k * kThreads + threadIdx.x;
    if (e >= n) break;
    const float dv = t.v[e] - means[kMomentumChannels];
    v_sq += static_cast<double>(dv * dv);
    for (int c = 0; c < kMomentumChannels; ++c) {
      const float dm = t.m[c * n + e] - means[c];
      m_sq[c] += static_cast<double>(dm * dm);
    }
  }
  const double v_sq_total = block_sum(v_sq, scratch);
  double m_sq_total[kMomentumChannels];
  for (int c = 0; c < kMomentumChannels; ++c) m_sq_total[c] = block_sum(m_sq[c], scratch);
  finite = __syncthreads_and(finite);
  if (threadIdx.x == 0) {
    // Re-centred on the exact chunk means: sum (x - a)^2 - count (mean - a)^2.
    const double dv = mo.v / count - means[kMomentumChannels];
    mo.v_sq_about_mean = v_sq_total - count * dv * dv;
    for (int c = 0; c < kMomentumChannels; ++c) {
      const double dm = mo.m[c] / count - means[c];
      mo.m_sq_about_mean[c] = m_sq_total[c] - count * dm * dm;
    }
    mo.finite = finite;
    out[t.first_chunk + chunk] = mo;
  }
}

// One block per tensor (items: one per tensor): its row of X and whether its gradients were
// finite. Each thread takes a stride of the tensor's chunks; the sums, then the spreads about
// the tensor's means, are block reductions in a fixed order.
__global__ void __launch_bounds__(kThreads) lstm_rows_kernel(StatsTable table,
                                                             const velo::ChunkMoments* chunks,
                                                             const float* loss_features,
                                                             const float* iteration,
                                                             float num_steps, float* X,
                                                             bool* tensor_finite) {
  __shared__ double scratch[kWarps];
  __shared__ double mu[kMomentumChannels];
  const StatsTensor& t = table.t[blockIdx.x];
  const velo::ChunkMoments* mine = chunks + t.first_chunk;
  const int64_t num_chunks = (t.numel + kChunk - 1) / kChunk;
  bool finite = true;
  velo::TensorMoments part;
  for (int64_t c = threadIdx.x; c < num_chunks; c += kThreads) {
    finite = finite && mine[c].finite;
    velo::add_chunk_sums(mine[c], part);
  }
  velo::TensorMoments mo;
  mo.p_sq = block_sum(part.p_sq, scratch);
  mo.v = block_sum(part.v, scratch);
  for (int k = 0; k < kMomentumChannels; ++k) mo.m[k] = block_sum(part.m[k], scratch);
  if (threadIdx.x == 0)
    for (int k = 0; k < kMomentumChannels; ++k) mu[k] = mo.m[k] / static_cast<double>(t.numel);
  __syncthreads();
  double means[kMomentumChannels];
  for (int k = 0; k < kMomentumChannels; ++k) means[k] = mu[k];
  for (int64_t c = threadIdx.x; c < num_chunks; c += kThreads)
    velo::add_chunk_spreads(mine[c], velo::chunk_count(t.numel, c, kChunk), means, part);
  for (int k = 0; k < kMomentumChannels; ++k) {
    mo.m_centred_sq[k] = block_sum(part.m_centred_sq[k], scratch);
    mo.v_spread_sq[k] = block_sum(part.v_spread_sq[k], scratch);
  }
  finite = __syncthreads_and(finite);
  if (threadIdx.x != 0) return;
  float* row = X + t.index * velo::kLstmInputs;
  const float step = *iteration;
  for (int k = 0; k < velo::kTimeFeatures; ++k) row[k] = velo::time_feature(step, num_steps, k);
  for (int k = 0; k < velo::kLossFeatures; ++k) row[velo::kFirstLossFeature + k] = loss_features[k];
  velo::lstm_tensor_features(t.numel > 0 ? mo : velo::TensorMoments{}, t.numel, t.dims, row);
  tensor_finite[t.index] = finite;
}

// velo_lstm_moments: one block per tensor (items: one per tensor), the reductions of
// lstm_rows_kernel written out as float64 [6] per tensor (row t.index of `out`): without
// `means`, sum p^2, sum m_k, sum v and the number of chunks holding a non-finite gradient;
// with the tensors' momentum means ([T, 3]), the spreads about them.
__global__ void __launch_bounds__(kThreads) moments_kernel(StatsTable table,
                                                           const velo::ChunkMoments* chunks,
                                                           const double* means, double* out) {
  __shared__ double scratch[kWarps];
  const StatsTensor& t = table.t[blockIdx.x];
  const velo::ChunkMoments* mine = chunks + t.first_chunk;
  const int64_t num_chunks = (t.numel + kChunk - 1) / kChunk;
  double* row = out + t.index * 6;
  velo::TensorMoments part;
  if (means == nullptr) {
    double nonfinite = 0.0;
    for (int64_t c = threadIdx.x; c < num_chunks; c += kThreads) {
      nonfinite += mine[c].finite ? 0.0 : 1.0;
      velo::add_chunk_sums(mine[c], part);
    }
    const double p_sq = block_sum(part.p_sq, scratch);
    const double v = block_sum(part.v, scratch);
    double m[kMomentumChannels];
    for (int k = 0; k < kMomentumChannels; ++k) m[k] = block_sum(part.m[k], scratch);
    nonfinite = block_sum(nonfinite, scratch);
    if (threadIdx.x == 0) {
      row[0] = p_sq;
      for (int k = 0; k < kMomentumChannels; ++k) row[1 + k] = m[k];
      row[4] = v;
      row[5] = nonfinite;
    }
    return;
  }
  double mu[kMomentumChannels];
  for (int k = 0; k < kMomentumChannels; ++k) mu[k] = means[t.index * kMomentumChannels + k];
  for (int64_t c = threadIdx.x; c < num_chunks; c += kThreads)
    velo::add_chunk_spreads(mine[c], velo::chunk_count(t.numel, c, kChunk), mu, part);
  for (int k = 0; k < kMomentumChannels; ++k) {
    const double m = block_sum(part.m_centred_sq[k], scratch);
    const double v = block_sum(part.v_spread_sq[k], scratch);
    if (threadIdx.x == 0) {
      row[k] = m;
      row[kMomentumChannels + k] = v;
    }
  }
}

// velo_lstm_rows: one thread per tensor of the table (items: one per tensor, t.numel and
// t.dims those of the whole tensor): its row of X from the complete sums and spreads.
__global__ void __launch_bounds__(kThreads) rows_from_moments_kernel(
    StatsTable table, const double* sums, const double* spreads, const float* loss_features,
    const float* iteration, float num_steps, float* X) {
  const int64_t item = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x;
  if (item >= table.count) return;
  const StatsTensor& t = table.t[item];
  const double* s = sums + t.index * 6;
  const double* d = spreads + t.index * 6;
  velo::TensorMoments mo;
  mo.p_sq = s[0];
  mo.v = s[4];
  for (int k = 0; k < kMomentumChannels; ++k) {
    mo.m[k] = s[1 + k];
    mo.m_centred_sq[k] = d[k];
    mo.v_spread_sq[k] = d[kMomentumChannels + k];
  }
  float* row = X + t.index * velo::kLstmInputs;
  const float step = *iteration;
  for (int k = 0; k < velo::kTimeFeatures; ++k) row[k] = velo::time_feature(step, num_steps, k);
  for (int k = 0; k < velo::kLossFeatures; ++k) row[velo::kFirstLossFeature + k] = loss_features[k];
  velo::lstm_tensor_features(mo, t.numel, t.dims, row);
}

// One block: out = AND of the n flags.
__global__ void __launch_bounds__(kThreads) all_true_kernel(const bool* flags, int64_t n,
                                                            bool* out) {
  bool all = true;
  for (int64_t i = threadIdx.x; i < n; i += kThreads) all = all && flags[i];
  all = __syncthreads_and(all);
  if (threadIdx.x == 0) *out = all;
}

}  // namespace cuda
}  // namespace lo_ops
