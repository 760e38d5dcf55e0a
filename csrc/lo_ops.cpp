// The lo_ops operator library: every op schema is declared here, once. Backends register
// their kernels next to their code (cpu/*.cpp, cuda/*.cu); the fake kernels live in Python
// (lo_ops/meta_kernels).
#include <Python.h>
#include <torch/library.h>

extern "C" {
// The extension is loaded for its op registrations only; it exposes no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lo_ops {

TORCH_LIBRARY(lo_ops, m) {
  // One small_fc_lopt step for the parameters of one (param group, device, dtype) bucket.
  // State is float32 with the channel axis first: momentum [3, *S], rms S; per tensor with
  // ndim >= 2 (in order) fac_row [3, *S without d0] and fac_col [3, *S without d1]; per tensor
  // with ndim < 2 (in order) fac_diag [3, *S]. state_steps (float32, one element each) count
  // the steps taken and are incremented. lr is a one-element tensor on the parameters'
  // device; meta_weights is the packed 39-32-32-2 network ([P], or [T, P]: one per tensor);
  // decays the 7 effective decays ([7], or [T, 7]). Without skip, the op checks the gradients
  // itself (in its first read of them) and, when any holds a NaN or an infinity, changes
  // nothing and counts no step; with skip (a bool scalar, the caller's check of a whole step
  // that spans several calls), it does the same when skip is true. μLO (spec 6): step_scale
  // multiplies every step (p <- p - lr * step_scale * step, weight decay not scaled) and
  // nan_to_num maps every gradient element through nan_to_num first (and checks nothing).
  m.def(
      "small_fc_lopt_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, "
      "Tensor(c!)[] rms, Tensor(d!)[] fac_row, Tensor(e!)[] fac_col, Tensor(f!)[] fac_diag, "
      "Tensor(g!)[] state_steps, Tensor lr, Tensor meta_weights, Tensor decays, "
      "float weight_decay, float step_mult, float exp_mult, Tensor? skip=None, "
      "float step_scale=1.0, bool nan_to_num=False) -> ()");

  // VeLO's per-tensor LSTM input (spec 3.2) for the tensors of one (device, dtype) bucket, read
  // before the step: returns X [T, 30] (float32; the time features from iteration / num_steps,
  // the 9 loss features as given, then each tensor's statistics of p, momentum and rms) and a
  // bool scalar, true when every gradient is finite.
  m.def(
      "velo_lstm_input(Tensor[] params, Tensor[] grads, Tensor[] momentum, Tensor[] rms, "
      "Tensor loss_features, Tensor iteration, float num_steps) -> (Tensor, Tensor)");

  // One VeLO per-element step (spec 3.5) for the parameters of one (param group, device,
  // dtype) bucket: gradients clipped to [-1000, 1000], accumulators as for small_fc_lopt with
  // VeLO's fixed decays, 30 normalised features, each tensor's own 30-4-4-3 MLP (mlp_weights
  // [T, 159], packed W0, b0, W1, b1, W2, b2) and lr_mult [T]. When skip (a bool scalar) is
  // true, nothing is changed.
  m.def(
      "velo_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, "
      "Tensor(c!)[] rms, Tensor(d!)[] fac_row, Tensor(e!)[] fac_col, Tensor(f!)[] fac_diag, "
      "Tensor lr, Tensor mlp_weights, Tensor lr_mult, Tensor skip, float weight_decay, "
      "float step_mult, float exp_mult) -> ()");

  // One Celo-Adam step (spec 5.3) for the parameters of one (param group, device, dtype)
  // bucket: gradients clipped to [-1000, 1000], exp_avg (decay 0.9) and exp_avg_sq (decay
  // 0.999), float32 state of the parameters' shapes, bias-corrected with tau = iteration + 1
  // (a float32 tensor with one element: the updates applied before this one), step
  // m_hat * lr_mult[i] * step_mult / (epsilon + sqrt(v_hat + 1e-10)) with lr_mult [T] from the
  // learned schedule, p <- p - lr * step, then decoupled weight decay. When skip (a bool
  // scalar) is true, nothing is changed.
  m.def(
      "celo_adam_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avg, "
      "Tensor(c!)[] exp_avg_sq, Tensor lr, Tensor lr_mult, Tensor iteration, Tensor skip, "
      "float weight_decay, float step_mult, float epsilon) -> ()");

  // -- Phase ops: one step of parameters that may be shards of larger tensors, split where the
  // step sums over a whole tensor. Each returns float64 sums over its shards' own elements; the
  // caller adds them up across the shards of each tensor (lo_ops._distributed) and hands the
  // complete sums to the next phase. global_geometry holds 5 integers per parameter: d0, d1,
  // the sizes of d0 and d1 and the element count of the whole tensor (d0 = d1 = -1 for
  // ndim < 2); a whole tensor is its own only shard.

  // Phase 1: per tensor with ndim >= 2, the sums of g^2 + 1e-30 over d0 (shaped like r without
  // its channel axis) and over d1 (like c); gradients clipped to [-grad_clip, grad_clip] first
  // when grad_clip > 0 (after nan_to_num, μLO's, when nan_to_num).
  m.def("factored_gsq_sums(Tensor[] grads, int[] global_geometry, float grad_clip, "
        "bool nan_to_num=False) -> Tensor[]");

  // Phase 2: fac_row / fac_col take the means of g^2 (complete phase-1 sums over the whole
  // sizes of d0 / d1) with decays[4:7] ([7] or [T, 7]); returns the sums of the new r over its
  // copy of d1 ([3, *S without d0 and d1] per tensor with ndim >= 2), one after the other in a
  // flat float64 tensor. With skip true (a bool scalar) the state is left unchanged.
  m.def(
      "factored_update_(Tensor[] params, Tensor(a!)[] fac_row, Tensor(b!)[] fac_col, "
      "Tensor[] gsq_sums, Tensor decays, Tensor? skip, int[] global_geometry) -> Tensor");

  // Phase 3: momentum, rms and fac_diag updated in place; returns [T, 28] (small_fc_lopt) or
  // [T, 30] (VeLO) sums of squares of each feature channel over the shard, from the complete
  // phase-2 row sums. When skip is true, nothing is changed and the sums are zeros. The
  // small_fc_lopt phase ops' nan_to_num is the one-call op's (μLO's gradients).
  m.def(
      "small_fc_lopt_feature_sums_(Tensor[] params, Tensor[] grads, Tensor(a!)[] momentum, "
      "Tensor(b!)[] rms, Tensor[] fac_row, Tensor[] fac_col, Tensor(c!)[] fac_diag, "
      "Tensor[] row_sums, Tensor decays, Tensor? skip, int[] global_geometry, "
      "bool nan_to_num=False) -> Tensor");
  m.def(
      "velo_feature_sums_(Tensor[] params, Tensor[] grads, Tensor(a!)[] momentum, "
      "Tensor(b!)[] rms, Tensor[] fac_row, Tensor[] fac_col, Tensor(c!)[] fac_diag, "
      "Tensor[] row_sums, Tensor skip, int[] global_geometry) -> Tensor");

  // Phase 4: the update of the parameters from the complete feature sums ([T, F]), as
  // small_fc_lopt_step_ / velo_step_ do it for whole tensors (the step counted). When skip is
  // true, nothing is changed (and nothing counted).
  m.def(
      "small_fc_lopt_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor[] momentum, "
      "Tensor[] rms, Tensor[] fac_row, Tensor[] fac_col, Tensor[] fac_diag, "
      "Tensor(b!)[] state_steps, Tensor lr, Tensor meta_weights, Tensor decays, Tensor? skip, "
      "Tensor[] row_sums, Tensor feature_sums, int[] global_geometry, float weight_decay, "
      "float step_mult, float exp_mult, float step_scale=1.0, bool nan_to_num=False) -> ()");
  m.def(
      "velo_apply_(Tensor(a!)[] params, Tensor[] grads, Tensor[] momentum, Tensor[] rms, "
      "Tensor[] fac_row, Tensor[] fac_col, Tensor[] fac_diag, Tensor lr, Tensor mlp_weights, "
      "Tensor lr_mult, Tensor skip, Tensor[] row_sums, Tensor feature_sums, "
      "int[] global_geometry, float weight_decay, float step_mult, float exp_mult) -> ()");

  // VeLO's LSTM input statistics of shards (spec 3.2), float64 [T, 6]: without momentum_means,
  // sum p^2, sum m_k (3), sum rms and the number of chunks holding a non-finite gradient; with
  // the tensors' complete momentum means ([T, 3] float64), sum (m_k - mean_k)^2 (3) and
  // sum (rms - mean_k)^2 (3).
  m.def(
      "velo_lstm_moments(Tensor[] params, Tensor[] grads, Tensor[] momentum, Tensor[] rms, "
      "Tensor? momentum_means) -> Tensor");

  // VeLO's LSTM input X [T, 30] (as velo_lstm_input) from the complete velo_lstm_moments sums
  // and spreads of T tensors, their element counts and numbers of axes longer than 1.
  m.def(
      "velo_lstm_rows(Tensor loss_features, Tensor iteration, float num_steps, Tensor sums, "
      "Tensor spreads, int[] numels, int[] dims) -> Tensor");
}

}  // namespace lo_ops
