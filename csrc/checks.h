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
  // The whole tensor's element count and lengths of d0 and d1 (those of the tensor itself,
  // unless it is a shard: see kGlobalGeometryWidth).
  int64_t total_numel = 0;
  int64_t d0_total = 1, d1_total = 1;
};

// The phase ops take each tensor as a shard of a whole tensor, described by `global_geometry`:
// kGlobalGeometryWidth integers per tensor, (d0, d1, size of d0, size of d1, numel) of the whole
// tensor, d0 = d1 = -1 for a tensor with ndim < 2. Axes come from the whole shape, so a shard
// is factored along the same axes as its tensor; means and normalisation count every element.
constexpr int64_t kGlobalGeometryWidth = 5;

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
                                                 at::TensorList fac_diag,
                                                 c10::IntArrayRef global_geometry = {});

// Validates the arguments of lo_ops::small_fc_lopt_step_ and describes each parameter.
std::vector<TensorInfo> check_small_fc_lopt_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
    at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& meta_weights,
    const at::Tensor& decays, c10::IntArrayRef global_geometry = {},
    const char* op = "small_fc_lopt_step_");

// Validates the arguments of lo_ops::velo_step_ and describes each parameter.
std::vector<TensorInfo> check_velo_step_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag, const at::Tensor& lr,
    const at::Tensor& mlp_weights, const at::Tensor& lr_mult, const at::Tensor& skip,
    c10::IntArrayRef global_geometry = {}, const char* op = "velo_step_");

// Validates the tensors (one device, one real floating dtype, dense) and global_geometry of a
// phase op that takes no accumulators (factored_gsq_sums: the gradients; factored_update_: the
// parameters) and describes each; with fac_row/fac_col, also checks their shapes.
std::vector<TensorInfo> check_shards(const char* op, const char* name, at::TensorList tensors,
                                     c10::IntArrayRef global_geometry);
void check_factored_state(const char* op, const std::vector<TensorInfo>& infos,
                          at::TensorList params, at::TensorList fac_row, at::TensorList fac_col);

// Validates the arguments of lo_ops::factored_update_ (gsq_sums: 2 per tensor with ndim >= 2,
// shaped like the tensor without d0, then without d1) and describes each parameter.
std::vector<TensorInfo> check_factored_update_inputs(at::TensorList params, at::TensorList fac_row,
                                                     at::TensorList fac_col, at::TensorList gsq_sums,
                                                     const at::Tensor& decays,
                                                     const c10::optional<at::Tensor>& skip,
                                                     c10::IntArrayRef global_geometry);

// Validates the row sums of r (one float64 [3, *S without d0 and d1] per factored tensor) and
// the complete feature sums ([T, features] float64) that phase ops take.
void check_row_sums(const char* op, at::TensorList row_sums, const std::vector<TensorInfo>& infos,
                    at::TensorList params);
void check_feature_sums(const char* op, const at::Tensor& sums, int64_t tensors, int64_t features,
                        const at::Device& device);
void check_skip(const char* op, const at::Tensor& skip, const at::Device& device);
void check_decays(const char* op, const at::Tensor& decays, int64_t tensors, const at::Device& device);

// Validates the arguments of lo_ops::velo_lstm_input.
void check_velo_lstm_input_inputs(at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum, at::TensorList rms,
                                  const at::Tensor& loss_features, const at::Tensor& iteration,
                                  double num_steps);

// Validates the arguments of lo_ops::celo_adam_step_.
void check_celo_adam_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, const at::Tensor& lr,
                            const at::Tensor& lr_mult, const at::Tensor& iteration,
                            const at::Tensor& skip, double step_mult, double epsilon);

// Validates the arguments of lo_ops::velo_lstm_rows.
void check_velo_lstm_rows_inputs(const at::Tensor& loss_features, const at::Tensor& iteration,
                                 double num_steps, const at::Tensor& sums,
                                 const at::Tensor& spreads, c10::IntArrayRef numels,
                                 c10::IntArrayRef dims);

// Validates the arguments of lo_ops::velo_lstm_moments.
void check_velo_lstm_moments_inputs(at::TensorList params, at::TensorList grads,
                                    at::TensorList momentum, at::TensorList rms,
                                    const c10::optional<at::Tensor>& momentum_means);

}  // namespace lo_ops
