// Host-side argument checks of the lo_ops ops, shared by their CPU and CUDA backends. Every
// error names the op, the offending argument and its index.
#pragma once

#include <ATen/core/Tensor.h>

#include <vector>

#include "factored.h"

namespace lo_ops {

// Per-parameter description built once per op call.
struct TensorInfo {
  int64_t numel = 0;
  bool factored = false;
  FactoredGeometry geo;   // valid when factored
  int64_t state_index = 0;  // index into fac_row/fac_col (factored) or fac_diag (unfactored)
};

// Row stride of a table that serves every tensor ([width]) or holds one row per tensor
// ([T, width]), e.g. small_fc_lopt's meta_weights and decays.
inline int64_t table_row_stride(const at::Tensor& table, int64_t width) {
  return table.dim() == 2 ? width : 0;
}

// The parameters, gradients and accumulators common to small_fc_lopt_step_ and velo_step_:
// one device, one floating dtype, dense gradients of the parameters' shapes, float32
// contiguous state of the right shapes (channel axis first).
std::vector<TensorInfo> check_accumulator_inputs(const char* op, at::TensorList params,
                                                 at::TensorList grads, at::TensorList momentum,
                                                 at::TensorList rms, at::TensorList fac_row,
                                                 at::TensorList fac_col,
                                                 at::TensorList fac_diag);

// Validates the arguments of lo_ops::small_fc_lopt_step_ and describes each parameter.
std::vector<TensorInfo> check_small_fc_lopt_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
    at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& meta_weights,
    const at::Tensor& decays);

// Validates the arguments of lo_ops::velo_step_ and describes each parameter.
std::vector<TensorInfo> check_velo_step_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag, const at::Tensor& lr,
    const at::Tensor& mlp_weights, const at::Tensor& lr_mult, const at::Tensor& skip);

// Validates the arguments of lo_ops::velo_lstm_input.
void check_velo_lstm_input_inputs(at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum, at::TensorList rms,
                                  const at::Tensor& loss_features, const at::Tensor& iteration,
                                  double num_steps);

}  // namespace lo_ops
