// Per-element arithmetic of small_fc_lopt (spec section 2), shared by the CPU and CUDA kernels.
// Backend files only gather the inputs of an element (indexing), reduce, and launch.
#pragma once

#include "lopt_math.h"

namespace lo_ops {
namespace small_fc_lopt {

constexpr int kFeatures = 28;       // normalised per-element features
constexpr int kTimeFeatures = 11;   // tanh(t / s - 1), identical for every element
constexpr int kInputs = kFeatures + kTimeFeatures;  // 39
constexpr int kHidden = 32;
constexpr int kOutputs = 2;
// Layout of the packed meta-network weights (PyTorch [out, in] Linear layout).
constexpr int kW0 = 0;                              // [kHidden, kInputs]
constexpr int kB0 = kW0 + kHidden * kInputs;        // [kHidden]
constexpr int kW1 = kB0 + kHidden;                  // [kHidden, kHidden]
constexpr int kB1 = kW1 + kHidden * kHidden;        // [kHidden]
constexpr int kW2 = kB1 + kHidden;                  // [kOutputs, kHidden]
constexpr int kB2 = kW2 + kOutputs * kHidden;       // [kOutputs]
constexpr int kPackedWeights = kB2 + kOutputs;
constexpr float kUnfactoredMomentumEps = 1e-6f;

LO_HD float time_scale(int k) {
  constexpr float kScales[kTimeFeatures] = {1.f,    3.f,     10.f,    30.f,     100.f,   300.f,
                                            1000.f, 3000.f, 10000.f, 30000.f, 100000.f};
  return kScales[k];
}

LO_HD float time_feature(float t, int k) { return tanhf(t / time_scale(k) - 1.0f); }

// Of the 28 channels, 13..24 (r, c and their rsqrt) are, for a factored tensor, constant
// along d0 (row channels 13-15, 19-21) or along d1 (column channels 16-18, 22-24). The other
// 16 vary element by element; element_channel(i) is the channel of the i-th of them.
constexpr int kElementFeatures = 16;
constexpr int kParamChannel = 1;
constexpr int kFirstRowChannel = 13;      // r: 13-15, rsqrt(r + 1e-8): 19-21
constexpr int kFirstColChannel = 16;      // c: 16-18, rsqrt(c + 1e-8): 22-24
constexpr int kRsqrtChannelOffset = 6;
LO_HD int element_channel(int i) { return i < 13 ? i : i + 12; }

// The 16 element-wise features (channels 0-12 and 25-27), un-normalised.
template <typename T>
LO_HD void element_features(const ElementInputs<T>& e, T (&f)[kElementFeatures]) {
  f[0] = e.g;
  f[1] = e.p;
  const T v_rsqrt = rsqrt_exact(e.v + 1e-6f);
  for (int k = 0; k < kMomentumChannels; ++k) {
    f[2 + k] = e.m[k];
    f[6 + k] = e.m[k] * v_rsqrt;
  }
  f[5] = e.v;
  f[9] = v_rsqrt;
  for (int k = 0; k < kFactoredChannels; ++k) {
    f[10 + k] = e.g * e.grad_factor[k];
    f[13 + k] = e.m[k] * e.mom_factor[k];
  }
}

// The 28 un-normalised features of spec section 2, in channel order.
template <typename T>
LO_HD void features(const ElementInputs<T>& e, T (&f)[kFeatures]) {
  T ef[kElementFeatures];
  element_features(e, ef);
  for (int i = 0; i < kElementFeatures; ++i) f[element_channel(i)] = ef[i];
  accumulator_features(e, kFirstRowChannel, f);
}

// What the shared kernels (CPU: cpu/adafactor_mlp_cpu.h, CUDA: cuda/adafactor_mlp.cuh) need to
// know of small_fc_lopt: feature layout, MLP sizes and offsets, the first-layer bias (b0 plus
// the time features) and the step scale (step_mult).
struct Policy {
  static constexpr int kFeatures = small_fc_lopt::kFeatures;
  static constexpr int kElementFeatures = small_fc_lopt::kElementFeatures;
  static constexpr int kFirstRowChannel = small_fc_lopt::kFirstRowChannel;
  static constexpr int kFirstColChannel = small_fc_lopt::kFirstColChannel;
  static constexpr int kParamChannel = small_fc_lopt::kParamChannel;
  static constexpr int kHidden = small_fc_lopt::kHidden;
  static constexpr int kInputs = small_fc_lopt::kInputs;  // row stride of W0
  static constexpr int kW0 = small_fc_lopt::kW0, kB0 = small_fc_lopt::kB0;
  static constexpr int kW1 = small_fc_lopt::kW1, kB1 = small_fc_lopt::kB1;
  static constexpr int kW2 = small_fc_lopt::kW2, kB2 = small_fc_lopt::kB2;
  static constexpr float kUnfactoredMomentumEps = small_fc_lopt::kUnfactoredMomentumEps;
  // CUDA update_kernel: blocks of 256 threads per SM its register budget allows (1: up to 255
  // registers; the 32-32 MLP keeps both hidden layers in registers, about 160).
  static constexpr int kUpdateBlocksPerSM = 1;

  static LO_HD float decay(const float* decays, int k) { return decays[k]; }
  template <typename T>
  static LO_HD T grad(T g) {
    return g;
  }
  static LO_HD int element_channel(int i) { return small_fc_lopt::element_channel(i); }
  template <typename T>
  static LO_HD void element_features(const ElementInputs<T>& e, T (&f)[kElementFeatures]) {
    small_fc_lopt::element_features(e, f);
  }
  template <typename T>
  static LO_HD void features(const ElementInputs<T>& e, T (&f)[kFeatures]) {
    small_fc_lopt::features(e, f);
  }
  // b0 plus the time features of step t (the same for every element of the tensor).
  static LO_HD float first_bias(const float* weights, float t, int j) {
    const float* row = weights + kW0 + j * kInputs;
    float b = weights[kB0 + j];
    for (int k = 0; k < kTimeFeatures; ++k) b += row[kFeatures + k] * time_feature(t, k);
    return b;
  }
  // The step scale; lr_mult is the tensor's step multiplier (μLO's μP multiplier s, spec 6.1;
  // 1 for small_fc_lopt itself, which leaves step_mult exactly as it is).
  static LO_HD float step_scale(float lr_mult, double /*sum_p_sq*/, int64_t /*n*/,
                                float step_mult) {
    return step_mult * lr_mult;
  }
};

}  // namespace small_fc_lopt
}  // namespace lo_ops
