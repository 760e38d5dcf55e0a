// Per-element and per-tensor arithmetic of VeLO (spec section 3), shared by the CPU and CUDA
// kernels. The accumulators are those of lopt_math.h, fed with the clipped gradient.
#pragma once

#include "lopt_math.h"

namespace lo_ops {
namespace velo {

constexpr float kGradClip = 1000.0f;  // gradients are clipped to [-1000, 1000] first
constexpr int kFeatures = 30;
constexpr int kHidden = 4;
constexpr int kOutputs = 3;  // direction, magnitude, and one unused output
// One tensor's blended MLP weights, packed (PyTorch [out, in] layout).
constexpr int kInputs = kFeatures;
constexpr int kW0 = 0;                              // [kHidden, kFeatures]
constexpr int kB0 = kW0 + kHidden * kFeatures;      // [kHidden]
constexpr int kW1 = kB0 + kHidden;                  // [kHidden, kHidden]
constexpr int kB1 = kW1 + kHidden * kHidden;        // [kHidden]
constexpr int kW2 = kB1 + kHidden;                  // [kOutputs, kHidden]
constexpr int kB2 = kW2 + kOutputs * kHidden;       // [kOutputs]
constexpr int kPackedWeights = kB2 + kOutputs;      // 159
constexpr float kUnfactoredMomentumEps = 0.0f;      // m * u^-0.5, no epsilon

// Fixed decays: momentum (0.9, 0.99, 0.999), rms 0.999, factored (0.9, 0.99, 0.999).
LO_HD float decay(int k) {
  constexpr float kValues[kDecays] = {0.9f, 0.99f, 0.999f, 0.999f, 0.9f, 0.99f, 0.999f};
  return kValues[k];
}

template <typename T>
LO_HD T clip_grad(T g) {
  return clip(g, -kGradClip, kGradClip);
}

// Channels 15..26 (r, c and their rsqrt) are, for a factored tensor, constant along d0 or d1;
// the other 18 (0-14, 27-29) vary element by element.
constexpr int kElementFeatures = 18;
constexpr int kParamChannel = 2;
constexpr int kFirstRowChannel = 15;      // r: 15-17, rsqrt(r + 1e-8): 21-23
constexpr int kFirstColChannel = 18;      // c: 18-20, rsqrt(c + 1e-8): 24-26
constexpr int kRsqrtChannelOffset = 6;
LO_HD int element_channel(int i) { return i < 15 ? i : i + 12; }

// The 18 element-wise features (channels 0-14 and 27-29), un-normalised: g, clip(g, 0.1), p,
// m (3), v, m rsqrt(v + 1e-6) (3), rsqrt(v + 1e-6), fac_g (3), g rsqrt(v + 1e-6), then the
// momentum times the factors (3).
template <typename T>
LO_HD void element_features(const ElementInputs<T>& e, T (&f)[kElementFeatures]) {
  f[0] = e.g;
  f[1] = clip(e.g, -0.1f, 0.1f);
  f[2] = e.p;
  const T v_rsqrt = rsqrt_exact(e.v + 1e-6f);
  for (int k = 0; k < kMomentumChannels; ++k) {
    f[3 + k] = e.m[k];
    f[7 + k] = e.m[k] * v_rsqrt;
  }
  f[6] = e.v;
  f[10] = v_rsqrt;
  for (int k = 0; k < kFactoredChannels; ++k) {
    f[11 + k] = e.g * e.grad_factor[k];
    f[15 + k] = e.m[k] * e.mom_factor[k];
  }
  f[14] = e.g * v_rsqrt;
}

// The 30 un-normalised features of spec section 3.5, in channel order.
template <typename T>
LO_HD void features(const ElementInputs<T>& e, T (&f)[kFeatures]) {
  T ef[kElementFeatures];
  element_features(e, ef);
  for (int i = 0; i < kElementFeatures; ++i) f[element_channel(i)] = ef[i];
  accumulator_features(e, kFirstRowChannel, f);
}

// param_scale = sqrt(mean(p^2) + 1e-9).
LO_HD float param_scale(double sum_p_sq, int64_t n) {
  return sqrtf(static_cast<float>(sum_p_sq / static_cast<double>(n)) + 1e-9f);
}

// What the shared kernels need to know of VeLO's per-element part: feature layout, MLP sizes
// and offsets (each tensor has its own blended MLP), the first-layer bias (b0) and the step
// scale lr_mult * param_scale * step_mult.
struct Policy {
  static constexpr int kFeatures = velo::kFeatures;
  static constexpr int kElementFeatures = velo::kElementFeatures;
  static constexpr int kFirstRowChannel = velo::kFirstRowChannel;
  static constexpr int kFirstColChannel = velo::kFirstColChannel;
  static constexpr int kParamChannel = velo::kParamChannel;
  static constexpr int kHidden = velo::kHidden;
  static constexpr int kInputs = velo::kInputs;  // row stride of W0
  static constexpr int kW0 = velo::kW0, kB0 = velo::kB0;
  static constexpr int kW1 = velo::kW1, kB1 = velo::kB1;
  static constexpr int kW2 = velo::kW2, kB2 = velo::kB2;
  static constexpr float kUnfactoredMomentumEps = velo::kUnfactoredMomentumEps;
  // CUDA update_kernel: blocks of 256 threads per SM its register budget allows (2: up to 128
  // registers; about 100 are used).
  static constexpr int kUpdateBlocksPerSM = 2;

  static LO_HD float decay(const float* /*decays*/, int k) { return velo::decay(k); }
  template <typename T>
  static LO_HD T grad(T g) {
    return clip_grad(g);
  }
  static LO_HD int element_channel(int i) { return velo::element_channel(i); }
  template <typename T>
  static LO_HD void element_features(const ElementInputs<T>& e, T (&f)[kElementFeatures]) {
    velo::element_features(e, f);
  }
  template <typename T>
  static LO_HD void features(const ElementInputs<T>& e, T (&f)[kFeatures]) {
    velo::features(e, f);
  }
  static LO_HD float first_bias(const float* weights, float /*t*/, int j) {
    return weights[kB0 + j];
  }
  // The sum of squares of the p channel is sum p^2.
  static LO_HD float step_scale(float lr_mult, double sum_p_sq, int64_t n, float step_mult) {
    return lr_mult * param_scale(sum_p_sq, n) * step_mult;
  }
};

// -- the per-tensor LSTM input (spec 3.2) --------------------------------------------------------
constexpr int kLstmInputs = 30;
constexpr int kTimeFeatures = 9;
constexpr int kLossFeatures = 9;
constexpr int kFirstLossFeature = kTimeFeatures;                   // 9-17
constexpr int kRmsFeature = kFirstLossFeature + kLossFeatures;     // 18
constexpr int kFirstRankFeature = kRmsFeature + 1;                 // 19-23
constexpr int kRankFeatures = 5;
constexpr int kFirstMomentumVariance = kFirstRankFeature + kRankFeatures;  // 24-26
constexpr int kFirstRmsSpread = kFirstMomentumVariance + kMomentumChannels;  // 27-29

LO_HD float time_feature(float t, float num_steps, int k) {
  constexpr float kOffsets[kTimeFeatures] = {0.03f, 0.1f, 0.2f, 0.4f, 0.6f,
                                             0.8f,  0.9f, 1.0f, 1.1f};
  return tanhf(10.0f * (t / num_steps - kOffsets[k]));
}

// cla(x) = 0.5 * clip(log(1e-8 + |10 x|), -5, 5)
LO_HD float log_feature(float x) { return 0.5f * clip(logf(1e-8f + fabsf(10.0f * x)), -5.0f, 5.0f); }

// Sums over one tensor from which its LSTM input follows (p, m, v as stored, unscaled):
// sum p^2, sum m_k, sum v, sum (m_k - mean m_k)^2 and sum (v - mean m_k)^2.
struct TensorMoments {
  double p_sq = 0;
  double m[kMomentumChannels] = {0, 0, 0};
  double v = 0;
  double m_centred_sq[kMomentumChannels] = {0, 0, 0};
  double v_spread_sq[kMomentumChannels] = {0, 0, 0};
};

// What one chunk [e0, e1) of a tensor contributes: plain sums, and sums of squares about the
// chunk's own means (so that spreads about large means do not cancel).
struct ChunkMoments {
  double p_sq = 0, v = 0, v_sq_about_mean = 0;
  double m[kMomentumChannels] = {0, 0, 0};
  double m_sq_about_mean[kMomentumChannels] = {0, 0, 0};
  bool finite = true;
};

// Elements in chunk c of a tensor of `numel` elements cut into chunks of `chunk` (the last one
// shorter).
LO_HD double chunk_count(int64_t numel, int64_t c, int64_t chunk) {
  const int64_t left = numel - c * chunk;
  return static_cast<double>(left < chunk ? left : chunk);
}

// A chunk's plain sums, added to mo.
LO_HD void add_chunk_sums(const ChunkMoments& ch, TensorMoments& mo) {
  mo.p_sq += ch.p_sq;
  mo.v += ch.v;
  for (int k = 0; k < kMomentumChannels; ++k) mo.m[k] += ch.m[k];
}

// A chunk of `count` elements' part of the sums of squares about the tensor's momentum means
// mu: per chunk, the sum of squares about the chunk mean plus count * (chunk mean - mu)^2.
LO_HD void add_chunk_spreads(const ChunkMoments& ch, double count,
                             const double (&mu)[kMomentumChannels], TensorMoments& mo) {
  for (int k = 0; k < kMomentumChannels; ++k) {
    const double dm = ch.m[k] / count - mu[k];
    const double dv = ch.v / count - mu[k];
    mo.m_centred_sq[k] += ch.m_sq_about_mean[k] + count * dm * dm;
    mo.v_spread_sq[k] += ch.v_sq_about_mean + count * dv * dv;
  }
}

// The moments of a whole tensor from its chunks of `chunk` elements, in chunk order.
LO_HD TensorMoments combine_chunks(const ChunkMoments* chunks, int64_t num_chunks, int64_t numel,
                                   int64_t chunk) {
  TensorMoments mo;
  for (int64_t c = 0; c < num_chunks; ++c) add_chunk_sums(chunks[c], mo);
  double mu[kMomentumChannels];  // the tensor's momentum means
  for (int k = 0; k < kMomentumChannels; ++k) mu[k] = mo.m[k] / static_cast<double>(numel);
  for (int64_t c = 0; c < num_chunks; ++c)
    add_chunk_spreads(chunks[c], chunk_count(numel, c, chunk), mu, mo);
  return mo;
}

// Row 30 of X for one tensor (all but the time and loss features, written by the caller).
// s = rsqrt(max(1e-9, mean p^2)); the momentum and rms statistics scale with s and s^2.
// `dims` is the number of axes longer than 1.
LO_HD void lstm_tensor_features(const TensorMoments& mo, int64_t n, int dims, float* row) {
  const double count = n > 0 ? static_cast<double>(n) : 1.0;
  const float mean_p_sq = static_cast<float>(mo.p_sq / count);
  const float s = rsqrt_exact(mean_p_sq < 1e-9f ? 1e-9f : mean_p_sq);
  row[kRmsFeature] = log_feature(static_cast<float>(mo.v / count) * s);
  for (int k = 0; k < kRankFeatures; ++k) row[kFirstRankFeature + k] = dims == k ? 1.0f : 0.0f;
  for (int k = 0; k < kMomentumChannels; ++k) {
    row[kFirstMomentumVariance + k] =
        log_feature(static_cast<float>(mo.m_centred_sq[k] / count) * (s * s));
    row[kFirstRmsSpread + k] = log_feature(static_cast<float>(mo.v_spread_sq[k] / count) * (s * s));
  }
}

}  // namespace velo
}  // namespace lo_ops
