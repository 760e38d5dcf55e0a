// Per-element arithmetic of small_fc_lopt, shared by the CPU and CUDA kernels.
//
// Everything here is float32 and follows ../shared/spec/ALGORITHMS.md sections 1 and 2.
// Backend files only gather the inputs of an element (indexing), reduce, and launch.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define LO_HD __host__ __device__ __forceinline__
#elif defined(__GNUC__)
// Always inlined, so that the CPU backend's per-ISA clones of its loops get ISA-specific code.
#define LO_HD inline __attribute__((always_inline))
#else
#define LO_HD inline
#endif

namespace lo_ops {
namespace small_fc_lopt {

constexpr int kMomentumChannels = 3;
constexpr int kFactoredChannels = 3;
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
// Decays, packed: momentum (3), rms (1), factored (3).
constexpr int kDecayMomentum = 0;
constexpr int kDecayRms = 3;
constexpr int kDecayFactored = 4;
constexpr int kDecays = 7;

LO_HD float time_scale(int k) {
  constexpr float kScales[kTimeFeatures] = {1.f,    3.f,     10.f,    30.f,     100.f,   300.f,
                                            1000.f, 3000.f, 10000.f, 30000.f, 100000.f};
  return kScales[k];
}

LO_HD float time_feature(float t, int k) { return tanhf(t / time_scale(k) - 1.0f); }

// The element-wise functions below take T = float (one element; CUDA threads, reductions)
// or T = a GCC vector of floats (the CPU kernel's tiles of elements, lane-wise). max and clip
// are comparisons, so NaN propagates as with jnp.maximum / jnp.clip and they compile to
// vector instructions instead of libm calls.
template <typename T>
LO_HD T splat(float x) {
  return T{} + x;
}

template <typename T>
LO_HD T relu(T x) {
  return x < T{} ? T{} : x;
}

template <typename T>
LO_HD T max_nan(T x, float lo) {
  return x < splat<T>(lo) ? splat<T>(lo) : x;
}

template <typename T>
LO_HD T sqrt_lanes(T x) {
  if constexpr (sizeof(T) == sizeof(float)) {
    return sqrtf(x);
  } else {
    T out;
    for (int l = 0; l < static_cast<int>(sizeof(T) / sizeof(float)); ++l) out[l] = sqrtf(x[l]);
    return out;
  }
}

template <typename T>
LO_HD T rsqrt_exact(T x) {
  return 1.0f / sqrt_lanes(x);
}

template <typename T>
LO_HD T safe_rsqrt(T x) {
  return rsqrt_exact(max_nan(x, 1e-9f));
}

// Exponential moving average as the original writes it: decay * state + (1 - decay) * value.
template <typename T>
LO_HD T ema(T state, T value, float decay) {
  return decay * state + (1.0f - decay) * value;
}

LO_HD float clip01(float x) { return x < 0.0f ? 0.0f : (x > 1.0f ? 1.0f : x); }

// g^2 + 1e-30: the input of the factored / diagonal second moments.
template <typename T>
LO_HD T factored_gsq(T g) {
  return g * g + 1e-30f;
}

// Factored second-moment factors, from the updated row/column accumulators.
LO_HD float row_factor(float r, float r_mean_over_d1) {
  return safe_rsqrt(r / (r_mean_over_d1 + 1e-9f));
}
LO_HD float col_factor(float c) { return safe_rsqrt(c); }
template <typename T>
LO_HD T accumulator_rsqrt(T x) {
  return rsqrt_exact(x + 1e-8f);
}

// Everything one element (or one vector of elements) contributes to its 28 features. For an
// unfactored tensor, set_unfactored() fills it from u, the diagonal accumulator (row = col = u).
// For a factored tensor, set_factored_factors() fills the row/column factors; its row and
// column channels (row, col and their rsqrt) are constant along d0 or d1, and a backend may
// feed them to the network per row and per column instead (see element_features()).
template <typename T>
struct ElementInputs {
  T g;
  T p;
  T m[kMomentumChannels];
  T v;
  T row[kFactoredChannels];
  T col[kFactoredChannels];
  T row_rsqrt[kFactoredChannels];
  T col_rsqrt[kFactoredChannels];
  T grad_factor[kFactoredChannels];
  T mom_factor[kFactoredChannels];
};

template <typename T>
LO_HD void set_unfactored(ElementInputs<T>& e, const T (&u)[kFactoredChannels]) {
  for (int k = 0; k < kFactoredChannels; ++k) {
    e.row[k] = u[k];
    e.col[k] = u[k];
    const T rs = accumulator_rsqrt(u[k]);
    e.row_rsqrt[k] = rs;
    e.col_rsqrt[k] = rs;
    e.grad_factor[k] = safe_rsqrt(u[k] + 1e-9f);
    e.mom_factor[k] = rsqrt_exact(u[k] + 1e-6f);
  }
}

// The row/column factors of a factored tensor: `rf` = row_factor, `cf` = col_factor. This is
// all that the element-wise channels need of the factored accumulators.
template <typename T>
LO_HD void set_factored_factors(ElementInputs<T>& e, const T (&rf)[kFactoredChannels],
                                const T (&cf)[kFactoredChannels]) {
  for (int k = 0; k < kFactoredChannels; ++k) {
    e.grad_factor[k] = rf[k] * cf[k];
    e.mom_factor[k] = rf[k] * cf[k];
  }
}

// Of the 28 channels, 13..24 (r, c and their rsqrt) are, for a factored tensor, constant
// along d0 (row channels 13-15, 19-21) or along d1 (column channels 16-18, 22-24). The other
// 16 vary element by element; element_channel(i) is the channel of the i-th of them.
constexpr int kElementFeatures = 16;
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
  for (int k = 0; k < kFactoredChannels; ++k) {
    f[kFirstRowChannel + k] = e.row[k];
    f[kFirstColChannel + k] = e.col[k];
    f[kFirstRowChannel + kRsqrtChannelOffset + k] = e.row_rsqrt[k];
    f[kFirstColChannel + kRsqrtChannelOffset + k] = e.col_rsqrt[k];
  }
}

// Second-moment normalisation scale of one channel: rsqrt(1e-5 + mean(x^2)).
LO_HD float normalisation_scale(double sum_sq, int64_t n) {
  return rsqrt_exact(1e-5f + static_cast<float>(sum_sq / static_cast<double>(n)));
}

// Output units of a dense layer computed together (their accumulators stay in registers);
// a backend may choose another value for its vector type.
template <typename V>
constexpr int kDenseBlock = 8;

// out = relu(W in + b) with W [Out, In] row-major, kDenseBlock<V> output units at a time.
// `b` holds floats or per-lane vectors.
template <int In, int Out, typename V, typename B>
LO_HD void dense_relu(const V (&in)[In], const float* w, const B* b, V (&out)[Out]) {
  constexpr int JB = kDenseBlock<V>;
  static_assert(Out % JB == 0, "output units must be a multiple of the block");
  for (int j0 = 0; j0 < Out; j0 += JB) {
    V acc[JB];
    for (int jj = 0; jj < JB; ++jj) acc[jj] = V{} + b[j0 + jj];
    for (int i = 0; i < In; ++i)
      for (int jj = 0; jj < JB; ++jj) acc[jj] += w[(j0 + jj) * In + i] * in[i];
    for (int jj = 0; jj < JB; ++jj) out[j0 + jj] = relu(acc[jj]);
  }
}

// The MLP 39 -> 32 -> 32 -> 2 of one element, or of a SIMD vector of elements: V is float
// (CUDA: one element per thread) or a GCC vector of floats (CPU). The first layer sees only
// the In features that vary per element: `w0` is [kHidden, In] with the per-tensor
// normalisation scales folded in, and `b0` [kHidden] (floats, or per-lane vectors) is the
// first-layer bias plus everything constant for the element: the time features and, for a
// factored tensor read with In = kElementFeatures, its row and column channels. w1, b1, w2,
// b2 as in the packed layout.
template <int In, typename V, typename B>
LO_HD void mlp_forward(const V (&x)[In], const float* w0, const B* b0, const float* w1,
                       const float* b1, const float* w2, const float* b2, V& direction,
                       V& magnitude) {
  V h1[kHidden];
  dense_relu(x, w0, b0, h1);
  V h2[kHidden];
  dense_relu(h1, w1, b1, h2);
  // The output layer: 4 interleaved partial sums per output keep 8 independent chains.
  constexpr int kParts = 4;
  static_assert(kHidden % kParts == 0, "hidden units must be a multiple of the parts");
  V part[kOutputs][kParts];
  for (int o = 0; o < kOutputs; ++o)
    for (int q = 0; q < kParts; ++q) part[o][q] = V{};
  for (int i = 0; i < kHidden; i += kParts)
    for (int o = 0; o < kOutputs; ++o)
      for (int q = 0; q < kParts; ++q) part[o][q] += w2[o * kHidden + i + q] * h2[i + q];
  direction = (splat<V>(b2[0]) + (part[0][0] + part[0][1])) + (part[0][2] + part[0][3]);
  magnitude = (splat<V>(b2[1]) + (part[1][0] + part[1][1])) + (part[1][2] + part[1][3]);
}

// exp, lane-wise. Backends that use a vector type specialise it; one element uses expf.
template <typename T>
LO_HD T exp_lanes(T x);

template <>
LO_HD float exp_lanes<float>(float x) {
  return expf(x);
}

// step = direction * exp(magnitude * exp_mult) * step_mult
template <typename T>
LO_HD T step_from_outputs(T direction, T magnitude, float exp_mult, float step_mult) {
  return direction * exp_lanes(magnitude * exp_mult) * step_mult;
}

// p <- p - lr * step, then decoupled weight decay p <- p - lr * weight_decay * p.
template <typename T>
LO_HD T apply_step(T p, T step, float lr, float weight_decay) {
  const T updated = p - lr * step;
  return updated - lr * weight_decay * updated;
}

}  // namespace small_fc_lopt
}  // namespace lo_ops
