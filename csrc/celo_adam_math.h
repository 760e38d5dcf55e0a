// Celo-Adam's per-element update (spec 5.3), shared by the CPU and CUDA backends: Adam with
// VeLO's gradient clip, one momentum decay (0.9) and one second-moment decay (0.999), bias
// correction in float32 exactly as the original computes it, and a per-tensor learning rate
// lr_mult * step_mult from the learned schedule.
#pragma once

#include <cmath>

#include "lopt_math.h"
#include "velo_math.h"

namespace lo_ops {
namespace celo_adam {

constexpr float kBeta1 = 0.9f;     // momentum decay
constexpr float kBeta2 = 0.999f;   // second-moment decay
constexpr float kRmsEps = 1e-10f;  // inside the square root

// 1 - decay^tau in float32, where decay^tau is the correctly rounded float32 power of the
// float32 constant (evaluated in float64 and rounded): what the original's float32 arithmetic
// gives. tau = updates applied before this one + 1.
LO_HD float bias_correction(float decay, float tau) {
  return 1.0f - static_cast<float>(pow(static_cast<double>(decay), static_cast<double>(tau)));
}

// The per-update constants of a tensor: bias corrections and lr_i = lr_mult * step_mult.
struct Constants {
  float bc1, bc2, lr_i, epsilon;
};

LO_HD Constants constants(float iteration, float lr_mult, float step_mult, float epsilon) {
  const float tau = iteration + 1.0f;
  return {bias_correction(kBeta1, tau), bias_correction(kBeta2, tau), lr_mult * step_mult, epsilon};
}

// One element: m and v updated in place from the clipped gradient; returns the new parameter
// (p - lr * step, then decoupled weight decay).
LO_HD float update(float p, float g, float& m, float& v, const Constants& c, float lr,
                   float weight_decay) {
  g = velo::clip_grad(g);
  m = ema(m, g, kBeta1);
  v = ema(v, g * g, kBeta2);
  const float m_hat = m / c.bc1;
  const float v_hat = v / c.bc2;
  const float step = m_hat * (c.lr_i / (c.epsilon + sqrtf(v_hat + kRmsEps)));
  return apply_step(p, step, lr, weight_decay);
}

}  // namespace celo_adam
}  // namespace lo_ops
