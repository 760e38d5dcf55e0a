// Per-element arithmetic shared by the learned optimizers and by the CPU and CUDA kernels:
// the accumulators of spec section 1.1, the normalisation of 1.2, and the dense layers of the
// per-element MLPs. Everything is float32.
//
// The element-wise functions take T = float (one element; CUDA threads, reductions) or T = a
// GCC vector of floats (the CPU kernels' tiles of elements, lane-wise). max and clip are
// comparisons, so NaN propagates as with jnp.maximum / jnp.clip and they compile to vector
// instructions instead of libm calls.
#pragma once

#include <cmath>
#include <cstdint>

// LO_UNROLL: loops over the network's units and inputs unrolled completely on the GPU, so that
// per-element arrays (features, hidden activations) stay in registers instead of local memory.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define LO_HD __host__ __device__ __forceinline__
#define LO_UNROLL _Pragma("unroll")
#elif defined(__GNUC__)
// Always inlined, so that the CPU backend's per-ISA clones of its loops get ISA-specific code.
#define LO_HD inline __attribute__((always_inline))
#else
#define LO_HD inline
#endif
#ifndef LO_UNROLL
#define LO_UNROLL
#endif

namespace lo_ops {

constexpr int kMomentumChannels = 3;
constexpr int kFactoredChannels = 3;
// Decays, packed: momentum (3), rms (1), factored (3).
constexpr int kDecayMomentum = 0;
constexpr int kDecayRms = 3;
constexpr int kDecayFactored = 4;
constexpr int kDecays = 7;

// x in every lane of a float or a GCC vector of floats. x - 0 is exactly x (also for -0.0
// and NaN), so compilers fold the subtraction away. The CPU's vector types specialise Splat
// with one broadcast instruction (cpu/lane_vector.h): GCC may otherwise build the vector
// with one masked insert per lane.
template <typename T>
struct Splat {
  static LO_HD T of(float x) { return x - T{}; }
};

template <typename T>
LO_HD T splat(float x) {
  return Splat<T>::of(x);
}

// max(x, 0) with NaN passing through; the CPU's vector types specialise it to one max
// instruction with the same result bits (cpu/lane_vector.h).
template <typename T>
LO_HD T relu(T x) {
  return x < T{} ? T{} : x;
}

template <typename T>
LO_HD T max_nan(T x, float lo) {
  return x < splat<T>(lo) ? splat<T>(lo) : x;
}

// clip(x, lo, hi) with NaN passing through.
template <typename T>
LO_HD T clip(T x, float lo, float hi) {
  const T low = x < splat<T>(lo) ? splat<T>(lo) : x;
  return low > splat<T>(hi) ? splat<T>(hi) : low;
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

// Exponential moving average as the originals write it: decay * state + (1 - decay) * value.
template <typename T>
LO_HD T ema(T state, T value, float decay) {
  return decay * state + (1.0f - decay) * value;
}

// NaN -> 0, +-inf -> +-FLT_MAX, as jnp.nan_to_num (mu_learned_optimization applies it to every
// gradient element first: spec 6.1).
template <typename T>
LO_HD T nan_to_num(T x) {
  const T c = clip(x, -3.4028234663852886e38f, 3.4028234663852886e38f);
  return c == c ? c : T{};
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

// Everything one element (or one vector of elements) contributes to its features. For an
// unfactored tensor, set_unfactored() fills it from u, the diagonal accumulator (row = col = u).
// For a factored tensor, set_factored_factors() fills the row/column factors; its row and
// column channels (row, col and their rsqrt) are constant along d0 or d1, and a backend may
// feed them to the network per row and per column instead.
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

// `mom_eps`: the momentum feature of an unfactored tensor is m * (u + mom_eps)^-0.5
// (small_fc_lopt: 1e-6; VeLO: none).
template <typename T>
LO_HD void set_unfactored(ElementInputs<T>& e, const T (&u)[kFactoredChannels], float mom_eps) {
  for (int k = 0; k < kFactoredChannels; ++k) {
    e.row[k] = u[k];
    e.col[k] = u[k];
    const T rs = accumulator_rsqrt(u[k]);
    e.row_rsqrt[k] = rs;
    e.col_rsqrt[k] = rs;
    e.grad_factor[k] = safe_rsqrt(u[k] + 1e-9f);
    e.mom_factor[k] = rsqrt_exact(u[k] + mom_eps);
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

// The 12 accumulator channels (r or u (3), c or u (3), rsqrt(r + 1e-8) (3), rsqrt(c + 1e-8)
// (3)) into f[first], in that order.
template <typename T, int F>
LO_HD void accumulator_features(const ElementInputs<T>& e, int first, T (&f)[F]) {
  for (int k = 0; k < kFactoredChannels; ++k) {
    f[first + k] = e.row[k];
    f[first + kFactoredChannels + k] = e.col[k];
    f[first + 2 * kFactoredChannels + k] = e.row_rsqrt[k];
    f[first + 3 * kFactoredChannels + k] = e.col_rsqrt[k];
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

// out = relu(W in + b) with W [Out, In] row-major, a block of output units at a time.
// `b` holds floats or per-lane vectors.
template <int In, int Out, typename V, typename B>
LO_HD void dense_relu(const V (&in)[In], const float* w, const B* b, V (&out)[Out]) {
  constexpr int JB = Out < kDenseBlock<V> ? Out : kDenseBlock<V>;
  static_assert(Out % JB == 0, "output units must be a multiple of the block");
  LO_UNROLL
  for (int j0 = 0; j0 < Out; j0 += JB) {
    V acc[JB];
    LO_UNROLL
    for (int jj = 0; jj < JB; ++jj) acc[jj] = V{} + b[j0 + jj];
    LO_UNROLL
    for (int i = 0; i < In; ++i) {
      LO_UNROLL
      for (int jj = 0; jj < JB; ++jj) acc[jj] += w[(j0 + jj) * In + i] * in[i];
    }
    LO_UNROLL
    for (int jj = 0; jj < JB; ++jj) out[j0 + jj] = relu(acc[jj]);
  }
}

// An MLP In -> Hidden -> Hidden -> (direction, magnitude, ...) of one element, or of a SIMD
// vector of elements: V is float (CUDA: one element per thread) or a GCC vector of floats
// (CPU). Only the first two outputs are computed. The first layer sees only the In features
// that vary per element: `w0` is [Hidden, In] with the per-tensor normalisation scales folded
// in, and `b0` [Hidden] (floats, or per-lane vectors) is the first-layer bias plus everything
// constant for the element (time features; a factored tensor's row and column channels).
// w1 [Hidden, Hidden], w2 [>= 2, Hidden] in PyTorch's [out, in] layout.
template <int In, int Hidden, typename V, typename B>
LO_HD void mlp_forward(const V (&x)[In], const float* w0, const B* b0, const float* w1,
                       const float* b1, const float* w2, const float* b2, V& direction,
                       V& magnitude) {
  V h1[Hidden];
  dense_relu(x, w0, b0, h1);
  V h2[Hidden];
  dense_relu(h1, w1, b1, h2);
  // The output layer: 4 interleaved partial sums per output keep 8 independent chains.
  constexpr int kParts = 4;
  static_assert(Hidden % kParts == 0, "hidden units must be a multiple of the parts");
  V part[2][kParts];
  LO_UNROLL
  for (int o = 0; o < 2; ++o) {
    LO_UNROLL
    for (int q = 0; q < kParts; ++q) part[o][q] = V{};
  }
  LO_UNROLL
  for (int i = 0; i < Hidden; i += kParts) {
    LO_UNROLL
    for (int o = 0; o < 2; ++o) {
      LO_UNROLL
      for (int q = 0; q < kParts; ++q) part[o][q] += w2[o * Hidden + i + q] * h2[i + q];
    }
  }
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

// step = direction * exp(magnitude * exp_mult) * scale. small_fc_lopt: scale = step_mult;
// VeLO: scale = lr_mult * param_scale * step_mult (per tensor).
template <typename T>
LO_HD T step_from_outputs(T direction, T magnitude, float exp_mult, float scale) {
  return direction * exp_lanes(magnitude * exp_mult) * scale;
}

// p <- p - lr * step, then decoupled weight decay p <- p - lr * weight_decay * p.
template <typename T>
LO_HD T apply_step(T p, T step, float lr, float weight_decay) {
  const T updated = p - lr * step;
  return updated - lr * weight_decay * updated;
}

}  // namespace lo_ops
