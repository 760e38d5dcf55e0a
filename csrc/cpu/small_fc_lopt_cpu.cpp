// CPU kernel of lo_ops::small_fc_lopt_step_: the shared kernel of adafactor_mlp_cpu.h with
// small_fc_lopt's features (28 channels), its 39-32-32-2 MLP shared by all tensors, and the
// time features folded into the first-layer bias.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../small_fc_lopt_math.h"
#include "adafactor_mlp_cpu.h"

namespace lo_ops {
namespace {

struct SmallFCLOptPolicy {
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
  // b0 plus the time features (the same for every element of the tensor).
  template <typename W>
  static float first_bias(const W& w, int j) {
    const float* row = w.weights + kW0 + j * kInputs;
    float b = w.weights[kB0 + j];
    for (int k = 0; k < small_fc_lopt::kTimeFeatures; ++k)
      b += row[kFeatures + k] * small_fc_lopt::time_feature(w.t, k);
    return b;
  }
  template <typename W>
  static float step_scale(const W&, double, float step_mult) {
    return step_mult;
  }
};

using Work = cpu::TensorWork<SmallFCLOptPolicy>;

void small_fc_lopt_step_cpu(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum, at::TensorList rms,
                            at::TensorList fac_row, at::TensorList fac_col,
                            at::TensorList fac_diag, at::TensorList state_steps,
                            const at::Tensor& lr, const at::Tensor& meta_weights,
                            const at::Tensor& decays, double weight_decay, double step_mult,
                            double exp_mult) {
  const auto infos = check_small_fc_lopt_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                                fac_diag, state_steps, lr, meta_weights, decays);
  if (params.empty()) return;
  const float lr_value = lr.item<float>();
  std::vector<Work> work;
  const at::Tensor scratch =
      cpu::prepare_work(work, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < params.size(); ++i) {
    work[i].weights = meta_weights.data_ptr<float>();
    work[i].t = *state_steps[i].data_ptr<float>();
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "small_fc_lopt_step_cpu", [&] {
                                    cpu::step_bucket<SmallFCLOptPolicy, scalar_t>(
                                        work, decays.data_ptr<float>(), lr_value, weight_decay,
                                        step_mult, exp_mult);
                                  });
  cpu::finish_work(work, params);
  for (const auto& step : state_steps) *step.data_ptr<float>() += 1.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(lo_ops, CPU, m) {
  m.impl("small_fc_lopt_step_", &small_fc_lopt_step_cpu);
}

}  // namespace lo_ops
