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

using SmallFCLOptPolicy = small_fc_lopt::Policy;

void small_fc_lopt_step_cpu(at::TensorList params, at::TensorList grads,
                            at::TensorList momentum, at::TensorList rms,
                            at::TensorList fac_row, at::TensorList fac_col,
                            at::TensorList fac_diag, at::TensorList state_steps,
                            const at::Tensor& lr, const at::Tensor& meta_weights,
                            const at::Tensor& decays, double weight_decay, double step_mult,
                            double exp_mult, const c10::optional<at::Tensor>& skip,
                            double step_scale, bool nan_to_num) {
  const auto infos = check_small_fc_lopt_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                                fac_diag, state_steps, lr, meta_weights, decays);
  if (params.empty()) return;
  if (skip.has_value()) {
    check_skip("small_fc_lopt_step_", *skip, params[0].device());
    if (*skip->data_ptr<bool>()) return;
  }
  const float* weights = meta_weights.data_ptr<float>();
  const float* decay_values = decays.data_ptr<float>();
  const int64_t weights_stride = table_row_stride(meta_weights, small_fc_lopt::kPackedWeights);
  const int64_t decays_stride = table_row_stride(decays, kDecays);
  // Without skip, a gradient holding a NaN or an infinity leaves everything unchanged and the
  // step uncounted; with nan_to_num (μLO) the gradients are made finite instead.
  const bool stepped = cpu::run_bucket<SmallFCLOptPolicy>(
      infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag,
      lr, weight_decay, step_mult, exp_mult, /*check_finite=*/!skip.has_value() && !nan_to_num,
      [&](size_t i, cpu::TensorWork<SmallFCLOptPolicy>& w) {
        w.weights = weights + i * weights_stride;
        w.decays = decay_values + i * decays_stride;
        w.t = *state_steps[i].data_ptr<float>();
        w.lr_mult = static_cast<float>(step_scale);
        w.nan_to_num = nan_to_num;
      });
  if (stepped)
    for (const auto& step : state_steps) *step.data_ptr<float>() += 1.0f;
}

}  // namespace

TORCH_LIBRARY_IMPL(lo_ops, CPU, m) {
  m.impl("small_fc_lopt_step_", &small_fc_lopt_step_cpu);
}

}  // namespace lo_ops
