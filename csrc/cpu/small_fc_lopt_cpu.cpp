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
