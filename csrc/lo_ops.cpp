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
  // decays the 7 effective decays ([7], or [T, 7]).
  m.def(
      "small_fc_lopt_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, "
      "Tensor(c!)[] rms, Tensor(d!)[] fac_row, Tensor(e!)[] fac_col, Tensor(f!)[] fac_diag, "
      "Tensor(g!)[] state_steps, Tensor lr, Tensor meta_weights, Tensor decays, "
      "float weight_decay, float step_mult, float exp_mult) -> ()");

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
}

}  // namespace lo_ops
