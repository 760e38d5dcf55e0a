// Compiled by tests/test_cuda_header.py with nvcc: the per-element maths shared with the CPU
// kernels must stay valid device code (one element per thread, V = float).
#include "small_fc_lopt_math.h"
#include "velo_math.h"

using namespace lo_ops;

__device__ void element_inputs(ElementInputs<float>& in, float g, float p, bool factored,
                               float mom_eps) {
  in.g = g;
  in.p = p;
  in.v = ema(0.0f, in.g * in.g, clip01(0.999f));
  for (int k = 0; k < kMomentumChannels; ++k) in.m[k] = ema(0.0f, in.g, 0.9f);
  if (factored) {
    const float rf[kFactoredChannels] = {row_factor(1.f, 2.f), 1.f, 1.f};
    const float cf[kFactoredChannels] = {col_factor(1.f), 1.f, 1.f};
    set_factored_factors(in, rf, cf);
  } else {
    const float u[kFactoredChannels] = {factored_gsq(in.g), 0.2f, 0.3f};
    set_unfactored(in, u, mom_eps);
  }
}

__global__ void small_fc_lopt_element(const float* weights, const float* w0s, const float* b0t,
                                      float* p, const float* g, int n, bool factored) {
  namespace s = small_fc_lopt;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  ElementInputs<float> in;
  element_inputs(in, g[i], p[i], factored, s::kUnfactoredMomentumEps);
  float d, m;
  if (factored) {
    float x[s::kElementFeatures];
    s::element_features(in, x);
    mlp_forward<s::kElementFeatures, s::kHidden>(x, w0s, b0t, weights + s::kW1, weights + s::kB1,
                                                 weights + s::kW2, weights + s::kB2, d, m);
  } else {
    float x[s::kFeatures];
    s::features(in, x);
    mlp_forward<s::kFeatures, s::kHidden>(x, w0s, b0t, weights + s::kW1, weights + s::kB1,
                                          weights + s::kW2, weights + s::kB2, d, m);
  }
  p[i] = apply_step(in.p, step_from_outputs(d, m, 0.001f, 0.001f), 1.0f, 0.0f) +
         s::time_feature(3.0f, 2) + normalisation_scale(4.0, 2);
}

__global__ void velo_element(const float* weights, const float* w0s, const float* b0t, float* p,
                             const float* g, int n, bool factored) {
  namespace v = velo;
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  ElementInputs<float> in;
  element_inputs(in, v::clip_grad(g[i]), p[i], factored, v::kUnfactoredMomentumEps);
  float d, m;
  if (factored) {
    float x[v::kElementFeatures];
    v::element_features(in, x);
    mlp_forward<v::kElementFeatures, v::kHidden>(x, w0s, b0t, weights + v::kW1, weights + v::kB1,
                                                 weights + v::kW2, weights + v::kB2, d, m);
  } else {
    float x[v::kFeatures];
    v::features(in, x);
    mlp_forward<v::kFeatures, v::kHidden>(x, w0s, b0t, weights + v::kW1, weights + v::kB1,
                                          weights + v::kW2, weights + v::kB2, d, m);
  }
  const float scale = 0.5f * v::param_scale(4.0, 2) * 0.001f;
  p[i] = apply_step(in.p, step_from_outputs(d, m, 0.001f, scale), 1.0f, 0.0f) +
         v::time_feature(3.0f, 20.0f, 2) + v::decay(1);
}

__global__ void velo_lstm_row(float* row, int n) {
  velo::TensorMoments mo;
  mo.p_sq = 2.0;
  mo.v = 0.5;
  velo::lstm_tensor_features(mo, n, 2, row);
}
