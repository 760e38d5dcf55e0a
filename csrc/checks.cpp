// Host-side argument checks of the lo_ops ops (checks.h), shared by every backend.
#include "checks.h"

#include <string>

#include "small_fc_lopt_math.h"
#include "velo_math.h"

namespace lo_ops {

namespace {
std::vector<int64_t> sizes_of(const at::Tensor& t) { return t.sizes().vec(); }

std::string shape_str(const std::vector<int64_t>& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_state(const char* op, const at::Tensor& t, const char* name, int64_t i,
                 const at::Tensor& param, const std::vector<int64_t>& expected) {
  TORCH_CHECK(t.device() == param.device(), op, ": ", name, "[", i, "] is on ", t.device(),
              " but its parameter is on ", param.device());
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, "[", i,
              "] must be float32 (optimizer state is kept in float32), got ", t.scalar_type());
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, "[", i, "] must be contiguous");
  TORCH_CHECK(sizes_of(t) == expected, op, ": ", name, "[", i, "] has shape ",
              shape_str(sizes_of(t)), " but a parameter of shape ", shape_str(sizes_of(param)),
              " needs ", shape_str(expected));
}

std::vector<int64_t> with_channels(const std::vector<int64_t>& s) {
  std::vector<int64_t> out{kMomentumChannels};
  out.insert(out.end(), s.begin(), s.end());
  return out;
}

void check_lr(const char* op, const at::Tensor& lr, const at::Device& device) {
  TORCH_CHECK(lr.numel() == 1 && lr.is_floating_point(), op,
              ": lr must be a floating-point tensor with one element, got ", lr.scalar_type(),
              " of shape ", shape_str(sizes_of(lr)));
  TORCH_CHECK(lr.device() == device, op, ": lr is on ", lr.device(),
              " but the parameters are on ", device);
}

// A contiguous float32 tensor of exactly `shape` on `device`.
void check_float_tensor(const char* op, const char* name, const at::Tensor& t,
                        const std::vector<int64_t>& shape, const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && sizes_of(t) == shape && t.is_contiguous() &&
                  t.device() == device,
              op, ": ", name, " must be a contiguous float32 tensor of shape ", shape_str(shape),
              " on ", device, ", got ", t.scalar_type(), " of shape ", shape_str(sizes_of(t)),
              " on ", t.device(), t.is_contiguous() ? "" : " (not contiguous)");
}

}  // namespace

std::vector<TensorInfo> check_accumulator_inputs(const char* op, at::TensorList params,
                                                 at::TensorList grads, at::TensorList momentum,
                                                 at::TensorList rms, at::TensorList fac_row,
                                                 at::TensorList fac_col,
                                                 at::TensorList fac_diag) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum.size() == n && rms.size() == n, op,
              ": params, grads, momentum and rms must have the same length, got ", n, ", ",
              grads.size(), ", ", momentum.size(), ", ", rms.size());
  TORCH_CHECK(fac_row.size() == fac_col.size(), op,
              ": fac_row and fac_col must have the same length, got ", fac_row.size(), " and ",
              fac_col.size());
  std::vector<TensorInfo> infos(n);
  if (n == 0) {
    TORCH_CHECK(fac_row.empty() && fac_diag.empty(), op,
                ": factored/diagonal state given for no parameters");
    return infos;
  }
  const auto device = params[0].device();
  const auto dtype = params[0].scalar_type();
  size_t n_factored = 0, n_diag = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    const auto& g = grads[i];
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one call takes the tensors of one device");
    TORCH_CHECK(p.scalar_type() == dtype, op, ": params[", i, "] is ", p.scalar_type(),
                " but params[0] is ", dtype, "; one call takes the tensors of one dtype");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()), op, ": params[", i,
                "] must be a real floating-point tensor, got ", p.scalar_type());
    TORCH_CHECK(p.layout() == at::kStrided, op, ": params[", i,
                "] must be a dense (strided) tensor");
    TORCH_CHECK(!g.is_sparse(), op, ": grads[", i, "] is sparse; dense gradients are needed");
    TORCH_CHECK(g.layout() == at::kStrided, op, ": grads[", i,
                "] must be a dense (strided) tensor");
    TORCH_CHECK(g.device() == device, op, ": grads[", i, "] is on ", g.device(),
                " but its parameter is on ", device);
    TORCH_CHECK(g.scalar_type() == dtype, op, ": grads[", i, "] is ", g.scalar_type(),
                " but its parameter is ", dtype);
    TORCH_CHECK(g.sizes() == p.sizes(), op, ": grads[", i, "] has shape ",
                shape_str(sizes_of(g)), " but its parameter has shape ",
                shape_str(sizes_of(p)));
    const auto s = sizes_of(p);
    auto& info = infos[i];
    info.numel = p.numel();
    info.factored = p.dim() >= 2;
    check_state(op, momentum[i], "momentum", i, p, with_channels(s));
    check_state(op, rms[i], "rms", i, p, s);
    if (info.factored) {
      TORCH_CHECK(n_factored < fac_row.size(), op, ": params has more tensors with ndim >= 2 "
                  "than fac_row/fac_col have entries (", fac_row.size(), ")");
      info.geo = factored_geometry(s);
      info.state_index = static_cast<int64_t>(n_factored);
      check_state(op, fac_row[n_factored], "fac_row", n_factored, p,
                  with_channels(drop_axis(s, info.geo.d0)));
      check_state(op, fac_col[n_factored], "fac_col", n_factored, p,
                  with_channels(drop_axis(s, info.geo.d1)));
      ++n_factored;
    } else {
      TORCH_CHECK(n_diag < fac_diag.size(), op, ": params has more tensors with ndim < 2 than "
                  "fac_diag has entries (", fac_diag.size(), ")");
      info.state_index = static_cast<int64_t>(n_diag);
      check_state(op, fac_diag[n_diag], "fac_diag", n_diag, p, with_channels(s));
      ++n_diag;
    }
  }
  TORCH_CHECK(n_factored == fac_row.size(), op, ": fac_row/fac_col have ", fac_row.size(),
              " entries but params has ", n_factored, " tensors with ndim >= 2");
  TORCH_CHECK(n_diag == fac_diag.size(), op, ": fac_diag has ", fac_diag.size(),
              " entries but params has ", n_diag, " tensors with ndim < 2");
  return infos;
}

std::vector<TensorInfo> check_small_fc_lopt_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
    at::TensorList state_steps, const at::Tensor& lr, const at::Tensor& meta_weights,
    const at::Tensor& decays) {
  constexpr const char* op = "small_fc_lopt_step_";
  TORCH_CHECK(state_steps.size() == params.size(), op,
              ": params and state_steps must have the same length, got ", params.size(),
              " and ", state_steps.size());
  auto infos =
      check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  if (params.empty()) return infos;
  const auto device = params[0].device();
  check_lr(op, lr, device);
  // Shared by all tensors ([P]) or one row per tensor ([T, P]), e.g. per-copy meta-parameters.
  const int64_t n = static_cast<int64_t>(params.size());
  check_float_tensor(op, "meta_weights", meta_weights,
                     meta_weights.dim() == 2 ? std::vector<int64_t>{n, small_fc_lopt::kPackedWeights}
                                             : std::vector<int64_t>{small_fc_lopt::kPackedWeights},
                     device);
  check_float_tensor(op, "decays", decays,
                     decays.dim() == 2 ? std::vector<int64_t>{n, kDecays}
                                       : std::vector<int64_t>{kDecays},
                     device);
  for (size_t i = 0; i < state_steps.size(); ++i) {
    const auto& step = state_steps[i];
    TORCH_CHECK(step.numel() == 1 && step.scalar_type() == at::kFloat &&
                    step.device() == device,
                op, ": state_steps[", i, "] must be a float32 tensor with one element on ",
                device, ", got ", step.scalar_type(), " of shape ", shape_str(sizes_of(step)),
                " on ", step.device());
  }
  return infos;
}

std::vector<TensorInfo> check_velo_step_inputs(
    at::TensorList params, at::TensorList grads, at::TensorList momentum, at::TensorList rms,
    at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag, const at::Tensor& lr,
    const at::Tensor& mlp_weights, const at::Tensor& lr_mult, const at::Tensor& skip) {
  constexpr const char* op = "velo_step_";
  auto infos =
      check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  const int64_t n = static_cast<int64_t>(params.size());
  const auto device = n > 0 ? params[0].device() : mlp_weights.device();
  check_lr(op, lr, device);
  check_float_tensor(op, "mlp_weights", mlp_weights, {n, velo::kPackedWeights}, device);
  check_float_tensor(op, "lr_mult", lr_mult, {n}, device);
  TORCH_CHECK(skip.scalar_type() == at::kBool && skip.numel() == 1 && skip.device() == device,
              op, ": skip must be a bool tensor with one element on ", device, ", got ",
              skip.scalar_type(), " of shape ", shape_str(sizes_of(skip)), " on ",
              skip.device());
  return infos;
}

void check_velo_lstm_input_inputs(at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum, at::TensorList rms,
                                  const at::Tensor& loss_features, const at::Tensor& iteration,
                                  double num_steps) {
  constexpr const char* op = "velo_lstm_input";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum.size() == n && rms.size() == n, op,
              ": params, grads, momentum and rms must have the same length, got ", n, ", ",
              grads.size(), ", ", momentum.size(), ", ", rms.size());
  TORCH_CHECK(num_steps > 0, op, ": num_steps must be > 0, got ", num_steps);
  const auto device = n > 0 ? params[0].device() : loss_features.device();
  check_float_tensor(op, "loss_features", loss_features, {velo::kLossFeatures}, device);
  TORCH_CHECK(iteration.numel() == 1 && iteration.scalar_type() == at::kFloat &&
                  iteration.device() == device,
              op, ": iteration must be a float32 tensor with one element on ", device, ", got ",
              iteration.scalar_type(), " of shape ", shape_str(sizes_of(iteration)), " on ",
              iteration.device());
  for (size_t i = 0; i < n; ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device);
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": params[", i, "] is ",
                p.scalar_type(), " but params[0] is ", params[0].scalar_type(),
                "; one call takes the tensors of one dtype");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()) && p.layout() == at::kStrided, op,
                ": params[", i, "] must be a dense real floating-point tensor");
    TORCH_CHECK(grads[i].layout() == at::kStrided && grads[i].device() == device &&
                    grads[i].scalar_type() == p.scalar_type() && grads[i].sizes() == p.sizes(),
                op, ": grads[", i, "] must be a dense ", p.scalar_type(), " tensor of shape ",
                shape_str(sizes_of(p)), " on ", device);
    check_state(op, momentum[i], "momentum", i, p, with_channels(sizes_of(p)));
    check_state(op, rms[i], "rms", i, p, sizes_of(p));
  }
}

}  // namespace lo_ops
