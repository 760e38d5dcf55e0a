// Compiled by tests/test_cuda_header.py with nvcc: the per-element maths shared with the CPU
// kernel must stay valid device code (one element per thread, V = float).
#include "small_fc_lopt_math.h"

using namespace lo_ops::small_fc_lopt;

__global__ void small_fc_lopt_element(const float* weights, const float* w0s, const float* b0t,
                                      float* p, const float* g, int n, bool factored) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n) return;
  ElementInputs<float> in;
  in.g = g[i];
  in.p = p[i];
  in.v = ema(0.0f, in.g * in.g, clip01(0.999f));
  for (int k = 0; k < kMomentumChannels; ++k) in.m[k] = ema(0.0f, in.g, 0.9f);
  float d, m;
  if (factored) {
    const float rf[kFactoredChannels] = {row_factor(1.f, 2.f), 1.f, 1.f};
    const float cf[kFactoredChannels] = {col_factor(1.f), 1.f, 1.f};
    set_factored_factors(in, rf, cf);
    float x[kElementFeatures];
    element_features(in, x);
    mlp_forward(x, w0s, b0t, weights + kW1, weights + kB1, weights + kW2, weights + kB2, d, m);
  } else {
    const float u[kFactoredChannels] = {factored_gsq(in.g), 0.2f, 0.3f};
    set_unfactored(in, u);
    float x[kFeatures];
    features(in, x);
    mlp_forward(x, w0s, b0t, weights + kW1, weights + kB1, weights + kW2, weights + kB2, d, m);
  }
  p[i] = apply_step(in.p, step_from_outputs(d, m, 0.001f, 0.001f), 1.0f, 0.0f) +
         time_feature(3.0f, 2) + normalisation_scale(4.0, 2);
}
