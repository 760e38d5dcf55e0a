// Host-side declarations shared by the small_fc_lopt backends.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "factored.h"

namespace lo_ops {

// Per-parameter description built once per op call by check_small_fc_lopt_inputs().
struct SmallFCLOptTensorInfo {
  int64_t numel = 0;
  bool factored = false;
  FactoredGeometry geo;   // valid when factored
  int64_t state_index = 0;  // index into fac_row/fac_col (factored) or fac_diag (unfactored)
};

// Validates the arguments of lo_ops::small_fc_lopt_step_ (names the offending argument and
// index in every error) and describes each parameter.
std::vector<SmallFCLOptTensorInfo> check_small_fc_lopt_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
    at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& meta_weights,
    const at::Tensor& decays);

}  // namespace lo_ops
