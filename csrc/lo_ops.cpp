// The lo_ops operator library: every op schema is declared here, once. Backends register
// their kernels next to their code (cpu/*.cpp, cuda/*.cu); the fake kernels live in Python
// (lo_ops/meta_kernels).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "small_fc_lopt.h"

extern "C" {
// The extension is loaded for its op registrations only; it exposes no Python functions.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

namespace lo_ops {

namespace {
std::vector<int64_t> sizes_of(const at::Tensor& t) { return t.sizes().vec(); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_state(const at::Tensor& t, const char* name, int64_t i, const at::Tensor& param,
                 const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.device() == param.device(), "small_fc_lopt_step_: ", name, "[", i, "] is on ",
              t.device(), " but its parameter is on ", param.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, "small_fc_lopt_step_: ", name, "[", i,
              "] must be float32 (optimizer state is kept in float32), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), "small_fc_lopt_step_: ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(sizes_of(t) == expected, "small_fc_lopt_step_: ", name, "[", i, "] has shape ",
              shape_str(sizes_of(t)), " but a parameter of shape ", shape_str(sizes_of(param)),
              " needs ", shape_str(expected));
}

std::vector<int64_t> with_channels(const std::vector<int64_t>& s) {
  std::vector<int64_t> out{small_fc_lopt::kMomentumChannels};
  out.insert(out.end(), s.begin(), s.end());
  return out;
}
}  // namespace

std::vector<SmallFCLOptTensorInfo> check_small_fc_lopt_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
    at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& meta_weights,
    const at::Tensor& decays) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum.size() == n && rms.size() == n &&
                  state_steps.size() == n,
              "small_fc_lopt_step_: params, grads, momentum, rms and state_steps must have the "
              "same length, got ",
              n, ", ", grads.size(), ", ", momentum.size(), ", ", rms.size(), ", ",
              state_steps.size());
  TORCH_CHECK(fac_row.size() == fac_col.size(),
              "small_fc_lopt_step_: fac_row and fac_col must have the same length, got ",
              fac_row.size(), " and ", fac_col.size());
  std::vector<SmallFCLOptTensorInfo> infos(n);
  if (n == 0) {
    TORCH_CHECK(fac_row.empty() && fac_diag.empty(),
                "small_fc_lopt_step_: factored/diagonal state given for no parameters");
    return infos;
  }
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  TORCH_CHECK(lr.numel() == 1 && lr.is_floating_point(),
              "small_fc_lopt_step_: lr must be a floating-point tensor with one element, got ",
              lr.scalar_type(), " of shape ", shape_str(sizes_of(lr)));
  TORCH_CHECK(lr.device() == device, "small_fc_lopt_step_: lr is on ", lr.device(),
              " but the parameters are on ", device);
  TORCH_CHECK(meta_weights.scalar_type() == at::kFloat && meta_weights.dim() == 1 &&
                  meta_weights.numel() == small_fc_lopt::kPackedWeights &&
                  meta_weights.is_contiguous() && meta_weights.device() == device,
              "small_fc_lopt_step_: meta_weights must be a contiguous float32 vector of ",
              small_fc_lopt::kPackedWeights, " elements on ", device, ", got ",
              meta_weights.scalar_type(), " of shape ", shape_str(sizes_of(meta_weights)),
              " on ", meta_weights.device());
  TORCH_CHECK(decays.scalar_type() == at::kFloat && decays.dim() == 1 &&
                  decays.numel() == small_fc_lopt::kDecays && decays.is_contiguous() &&
                  decays.device() == device,
              "small_fc_lopt_step_: decays must be a contiguous float32 vector of ",
              small_fc_lopt::kDecays, " elements on ", device, ", got ",
              decays.scalar_type(), " of shape ", shape_str(sizes_of(decays)), " on ",
              decays.device());
  size_t n_factored = 0, n_diag = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK(p.device() == device, "small_fc_lopt_step_: params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one call takes the tensors of one device");
    TORCH_CHECK(p.scalar_type() == dtype, "small_fc_lopt_step_: params[", i, "] is ",
                p.scalar_type(), " but params[0] is ", dtype,
                "; one call takes the tensors of one dtype");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), "small_fc_lopt_step_: params[", i,
                "] must be a real floating-point tensor, got ", p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided, "small_fc_lopt_step_: params[", i,
                "] must be a dense (strided) tensor");
    TORCH_CHECK(!g.is_sparse(), "small_fc_lopt_step_: grads[", i,
                "] is sparse; small_fc_lopt needs dense gradients");
    TORCH_CHECK(g.layout() == at::kStrided, "small_fc_lopt_step_: grads[", i,
                "] must be a dense (strided) tensor");
    TORCH_CHECK(g.device() == device, "small_fc_lopt_step_: grads[", i, "] is on ", g.device(),
                " but its parameter is on ", device);
    TORCH_CHECK(g.scalar_type() == dtype, "small_fc_lopt_step_: grads[", i, "] is ",
                g.scalar_type(), " but its parameter is ", dtype);
    TORCH_CHECK(g.sizes() == p.sizes(), "small_fc_lopt_step_: grads[", i, "] has shape ",
                shape_str(sizes_of(g)), " but its parameter has shape ",
                shape_str(sizes_of(p)));
    const auto s = sizes_of(p);
    auto& info = infos[i];
    info.numel = p.numel();
    info.factored = p.dim() >= 2;
    check_state(momentum[i], "momentum", i, p, with_channels(s));
    check_state(rms[i], "rms", i, p, s);
    const auto& step = state_steps[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat &&
                    step.device() == device,
                "small_fc_lopt_step_: state_steps[", i,
                "] must be a float32 tensor with one element on ", device, ", got ",
                step.scalar_type(), " of shape ", shape_str(sizes_of(step)), " on ",
                step.device());
    if (info.factored) {
      TORCH_CHECK(n_factored < fac_row.size(), "small_fc_lopt_step_: params has more tensors "
                  "with ndim >= 2 than fac_row/fac_col have entries (", fac_row.size(), ")");
      info.geo = factored_geometry(s);
      info.state_index = static_cast<int64_t>(n_factored);
      check_state(fac_row[n_factored], "fac_row", n_factored, p,
                  with_channels(drop_axis(s, info.geo.d0)));
      check_state(fac_col[n_factored], "fac_col", n_factored, p,
                  with_channels(drop_axis(s, info.geo.d1)));
      ++n_factored;
    } else {
      TORCH_CHECK(n_diag < fac_diag.size(), "small_fc_lopt_step_: params has more tensors "
                  "with ndim < 2 than fac_diag has entries (", fac_diag.size(), ")");
      info.state_index = static_cast<int64_t>(n_diag);
      check_state(fac_diag[n_diag], "fac_diag", n_diag, p, with_channels(s));
      ++n_diag;
    }
  }
  TORCH_CHECK(n_factored == fac_row.size(), "small_fc_lopt_step_: fac_row/fac_col have ",
              fac_row.size(), " entries but params has ", n_factored,
              " tensors with ndim >= 2");
  TORCH_CHECK(n_diag == fac_diag.size(), "small_fc_lopt_step_: fac_diag has ", fac_diag.size(),
              " entries but params has ", n_diag, " tensors with ndim < 2");
  return infos;
}

TORCH_LIBRARY(lo_ops, m) {
  // One small_fc_lopt step for the parameters of one (param group, device, dtype) bucket.
  // State is float32 with the channel axis first: momentum [3, *S], rms S; per tensor with
  // ndim >= 2 (in order) fac_row [3, *S without d0] and fac_col [3, *S without d1]; per tensor
  // with ndim < 2 (in order) fac_diag [3, *S]. state_steps (float32, one element each) count
  // the steps taken and are incremented. lr is a one-element tensor on the parameters'
  // device; meta_weights is the packed 39-32-32-2 network; decays the 7 effective decays.
  m.def(
      "small_fc_lopt_step_(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum, "
      "Tensor(c!)[] rms, Tensor(d!)[] fac_row, Tensor(e!)[] fac_col, Tensor(f!)[] fac_diag, "
      "Tensor(g!)[] state_steps, Tensor lr, Tensor meta_weights, Tensor decays, "
      "float weight_decay, float step_mult, float exp_mult) -> ()");
}

}  // namespace lo_ops
