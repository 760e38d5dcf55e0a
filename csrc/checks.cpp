// Host-side argument checks of the lo_ops ops (checks.h), shared by every backend.
#include "checks.h"

#include <cmath>
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

// Tensor i's entry of global_geometry (see kGlobalGeometryWidth), checked against its shard
// of shape `s`; sets info's whole-tensor sizes and returns the shard's factored geometry.
FactoredGeometry global_geometry_of(const char* op, const char* name, c10::IntArrayRef geometry,
                                    size_t i, const std::vector<int64_t>& s, TensorInfo& info) {
  const int64_t* g = geometry.data() + kGlobalGeometryWidth * static_cast<int64_t>(i);
  const int64_t d0 = g[0], d1 = g[1], n0 = g[2], n1 = g[3], numel = g[4];
  const int64_t nd = static_cast<int64_t>(s.size());
  TORCH_CHECK(numel >= info.numel, op, ": global_geometry of ", name, "[", i, "] gives ", numel,
              " elements, fewer than its shard's ", info.numel);
  info.total_numel = numel;
  if (!info.factored) {
    TORCH_CHECK(d0 == -1 && d1 == -1, op, ": global_geometry of ", name, "[", i,
                "] (ndim ", nd, " < 2) must have d0 = d1 = -1, got ", d0, " and ", d1);
    return FactoredGeometry{};
  }
  TORCH_CHECK(d0 >= 0 && d0 < nd && d1 >= 0 && d1 < nd && d0 != d1, op,
              ": global_geometry of ", name, "[", i, "] has axes d0 = ", d0, ", d1 = ", d1,
              "; they must be two different axes of its ", nd, " dimensions");
  TORCH_CHECK(n0 >= s[d0] && n1 >= s[d1], op, ": global_geometry of ", name, "[", i,
              "] gives sizes ", n0, " and ", n1, " to axes ", d0, " and ", d1,
              ", smaller than its shard's ", shape_str(s));
  info.d0_total = n0;
  info.d1_total = n1;
  return factored_geometry(s, static_cast<int>(d0), static_cast<int>(d1));
}

void check_loss_inputs(const char* op, const at::Tensor& loss_features,
                       const at::Tensor& iteration, double num_steps, const at::Device& device) {
  TORCH_CHECK(num_steps > 0, op, ": num_steps must be > 0, got ", num_steps);
  check_float_tensor(op, "loss_features", loss_features, {velo::kLossFeatures}, device);
  TORCH_CHECK(iteration.numel() == 1 && iteration.scalar_type() == at::kFloat &&
                  iteration.device() == device,
              op, ": iteration must be a float32 tensor with one element on ", device, ", got ",
              iteration.scalar_type(), " of shape ", shape_str(sizes_of(iteration)), " on ",
              iteration.device());
}

}  // namespace

std::vector<TensorInfo> check_accumulator_inputs(const char* op, at::TensorList params,
                                                 at::TensorList grads, at::TensorList momentum,
                                                 at::TensorList rms, at::TensorList fac_row,
                                                 at::TensorList fac_col,
                                                 at::TensorList fac_diag,
                                                 c10::IntArrayRef global_geometry) {
  const size_t n = params.size();
  TORCH_CHECK(global_geometry.empty() ||
                  static_cast<int64_t>(global_geometry.size()) ==
                      kGlobalGeometryWidth * static_cast<int64_t>(n),
              op, ": global_geometry must hold ", kGlobalGeometryWidth,
              " integers per parameter (", kGlobalGeometryWidth * static_cast<int64_t>(n),
              "), got ", global_geometry.size());
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
    info.total_numel = info.numel;
    info.factored = p.dim() >= 2;
    check_state(op, momentum[i], "momentum", i, p, with_channels(s));
    check_state(op, rms[i], "rms", i, p, s);
    if (info.factored) {
      TORCH_CHECK(n_factored < fac_row.size(), op, ": params has more tensors with ndim >= 2 "
                  "than fac_row/fac_col have entries (", fac_row.size(), ")");
      if (global_geometry.empty()) {
        info.geo = factored_geometry(s);
        info.d0_total = s[info.geo.d0];
        info.d1_total = s[info.geo.d1];
      } else {
        info.geo = global_geometry_of(op, "params", global_geometry, i, s, info);
      }
      info.state_index = static_cast<int64_t>(n_factored);
      check_state(op, fac_row[n_factored], "fac_row", n_factored, p,
                  with_channels(drop_axis(s, info.geo.d0)));
      check_state(op, fac_col[n_factored], "fac_col", n_factored, p,
                  with_channels(drop_axis(s, info.geo.d1)));
      ++n_factored;
    } else {
      if (!global_geometry.empty()) global_geometry_of(op, "params", global_geometry, i, s, info);
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
    const at::Tensor& decays, c10::IntArrayRef global_geometry, const char* op) {
  TORCH_CHECK(state_steps.size() == params.size(), op,
              ": params and state_steps must have the same length, got ", params.size(),
              " and ", state_steps.size());
  auto infos = check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col,
                                        fac_diag, global_geometry);
  if (params.empty()) return infos;
  const auto device = params[0].device();
  check_lr(op, lr, device);
  // Shared by all tensors ([P]) or one row per tensor ([T, P]), e.g. per-copy meta-parameters.
  const int64_t n = static_cast<int64_t>(params.size());
  check_float_tensor(op, "meta_weights", meta_weights,
                     meta_weights.dim() == 2 ? std::vector<int64_t>{n, small_fc_lopt::kPackedWeights}
                                             : std::vector<int64_t>{small_fc_lopt::kPackedWeights},
                     device);
  check_decays(op, decays, n, device);
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
    const at::Tensor& mlp_weights, const at::Tensor& lr_mult, const at::Tensor& skip,
    c10::IntArrayRef global_geometry, const char* op) {
  auto infos = check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col,
                                        fac_diag, global_geometry);
  const int64_t n = static_cast<int64_t>(params.size());
  const auto device = n > 0 ? params[0].device() : mlp_weights.device();
  check_lr(op, lr, device);
  check_float_tensor(op, "mlp_weights", mlp_weights, {n, velo::kPackedWeights}, device);
  check_float_tensor(op, "lr_mult", lr_mult, {n}, device);
  check_skip(op, skip, device);
  return infos;
}

std::vector<TensorInfo> check_shards(const char* op, const char* name, at::TensorList tensors,
                                     c10::IntArrayRef global_geometry) {
  const size_t n = tensors.size();
  TORCH_CHECK(static_cast<int64_t>(global_geometry.size()) ==
                  kGlobalGeometryWidth * static_cast<int64_t>(n),
              op, ": global_geometry must hold ", kGlobalGeometryWidth, " integers per tensor (",
              kGlobalGeometryWidth * static_cast<int64_t>(n), "), got ", global_geometry.size());
  std::vector<TensorInfo> infos(n);
  int64_t n_factored = 0, n_diag = 0;
  for (size_t i = 0; i < n; ++i) {
    const auto& t = tensors[i];
    TORCH_CHECK(t.device() == tensors[0].device(), op, ": ", name, "[", i, "] is on ",
                t.device(), " but ", name, "[0] is on ", tensors[0].device());
    TORCH_CHECK(t.scalar_type() == tensors[0].scalar_type(), op, ": ", name, "[", i, "] is ",
                t.scalar_type(), " but ", name, "[0] is ", tensors[0].scalar_type(),
                "; one call takes the tensors of one dtype");
    TORCH_CHECK(at::isFloatingType(t.scalar_type()) && t.layout() == at::kStrided, op, ": ",
                name, "[", i, "] must be a dense real floating-point tensor");
    auto& info = infos[i];
    info.numel = t.numel();
    info.factored = t.dim() >= 2;
    info.state_index = info.factored ? n_factored++ : n_diag++;
    info.geo = global_geometry_of(op, name, global_geometry, i, sizes_of(t), info);
  }
  return infos;
}

void check_factored_state(const char* op, const std::vector<TensorInfo>& infos,
                          at::TensorList params, at::TensorList fac_row, at::TensorList fac_col) {
  size_t k = 0;
  for (size_t i = 0; i < infos.size(); ++i) {
    if (!infos[i].factored) continue;
    TORCH_CHECK(k < fac_row.size() && k < fac_col.size(), op,
                ": params has more tensors with ndim >= 2 than fac_row/fac_col have entries (",
                fac_row.size(), ", ", fac_col.size(), ")");
    const auto s = sizes_of(params[i]);
    check_state(op, fac_row[k], "fac_row", k, params[i], with_channels(drop_axis(s, infos[i].geo.d0)));
    check_state(op, fac_col[k], "fac_col", k, params[i], with_channels(drop_axis(s, infos[i].geo.d1)));
    ++k;
  }
  TORCH_CHECK(k == fac_row.size() && k == fac_col.size(), op, ": fac_row/fac_col have ",
              fac_row.size(), " and ", fac_col.size(), " entries but params has ", k,
              " tensors with ndim >= 2");
}

std::vector<TensorInfo> check_factored_update_inputs(at::TensorList params, at::TensorList fac_row,
                                                     at::TensorList fac_col, at::TensorList gsq_sums,
                                                     const at::Tensor& decays,
                                                     const c10::optional<at::Tensor>& skip,
                                                     c10::IntArrayRef global_geometry) {
  constexpr const char* op = "factored_update_";
  auto infos = check_shards(op, "params", params, global_geometry);
  check_factored_state(op, infos, params, fac_row, fac_col);
  if (params.empty()) return infos;
  const auto device = params[0].device();
  check_decays(op, decays, static_cast<int64_t>(params.size()), device);
  if (skip.has_value()) check_skip(op, *skip, device);
  TORCH_CHECK(gsq_sums.size() == 2 * fac_row.size(), op, ": gsq_sums needs 2 entries per tensor "
              "with ndim >= 2 (", 2 * fac_row.size(), "), got ", gsq_sums.size());
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& info = infos[i];
    if (!info.factored) continue;
    for (int side = 0; side < 2; ++side) {
      const auto& t = gsq_sums[2 * info.state_index + side];
      const int axis = side == 0 ? info.geo.d0 : info.geo.d1;
      TORCH_CHECK(t.scalar_type() == at::kDouble && t.is_contiguous() &&
                      sizes_of(t) == drop_axis(sizes_of(params[i]), axis) && t.device() == device,
                  op, ": gsq_sums[", 2 * info.state_index + side, "] must be a contiguous float64 "
                  "tensor of the shape of params[", i, "] without axis ", axis, " on ", device);
    }
  }
  return infos;
}

void check_row_sums(const char* op, at::TensorList row_sums, const std::vector<TensorInfo>& infos,
                    at::TensorList params) {
  size_t k = 0;
  for (size_t i = 0; i < infos.size(); ++i) {
    if (!infos[i].factored) continue;
    TORCH_CHECK(k < row_sums.size(), op, ": row_sums has ", row_sums.size(),
                " entries, fewer than the tensors with ndim >= 2");
    const auto& t = row_sums[k];
    const auto& geo = infos[i].geo;
    const auto sizes = sizes_of(params[i]);
    const auto expected = with_channels(drop_axis(drop_axis(sizes, std::max(geo.d0, geo.d1)),
                                                  std::min(geo.d0, geo.d1)));
    TORCH_CHECK(t.scalar_type() == at::kDouble && sizes_of(t) == expected && t.is_contiguous() &&
                    t.device() == params[i].device(),
                op, ": row_sums[", k, "] must be a contiguous float64 tensor of shape ",
                shape_str(expected), " on ", params[i].device(), ", got ", t.scalar_type(),
                " of shape ", shape_str(sizes_of(t)), " on ", t.device());
    ++k;
  }
  TORCH_CHECK(k == row_sums.size(), op, ": row_sums has ", row_sums.size(), " entries but ",
              k, " tensors have ndim >= 2");
}

void check_feature_sums(const char* op, const at::Tensor& sums, int64_t tensors, int64_t features,
                        const at::Device& device) {
  TORCH_CHECK(sums.scalar_type() == at::kDouble && sums.is_contiguous() &&
                  sizes_of(sums) == std::vector<int64_t>({tensors, features}) &&
                  sums.device() == device,
              op, ": feature_sums must be a contiguous float64 tensor of shape [", tensors, ", ",
              features, "] on ", device, ", got ", sums.scalar_type(), " of shape ",
              shape_str(sizes_of(sums)), " on ", sums.device());
}

void check_skip(const char* op, const at::Tensor& skip, const at::Device& device) {
  TORCH_CHECK(skip.scalar_type() == at::kBool && skip.numel() == 1 && skip.device() == device,
              op, ": skip must be a bool tensor with one element on ", device, ", got ",
              skip.scalar_type(), " of shape ", shape_str(sizes_of(skip)), " on ",
              skip.device());
}

void check_decays(const char* op, const at::Tensor& decays, int64_t tensors,
                  const at::Device& device) {
  check_float_tensor(op, "decays", decays,
                     decays.dim() == 2 ? std::vector<int64_t>{tensors, kDecays}
                                       : std::vector<int64_t>{kDecays},
                     device);
}

namespace {
// Parameters of one device and one real floating dtype, dense, with dense gradients of their
// dtype and shape.
void check_params_and_grads(const char* op, at::TensorList params, at::TensorList grads,
                            const at::Device& device) {
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& p = params[i];
    TORCH_CHECK(p.device() == device, op, ": params[", i, "] is on ", p.device(),
                " but params[0] is on ", device, "; one call takes the tensors of one device");
    TORCH_CHECK(p.scalar_type() == params[0].scalar_type(), op, ": params[", i, "] is ",
                p.scalar_type(), " but params[0] is ", params[0].scalar_type(),
                "; one call takes the tensors of one dtype");
    TORCH_CHECK(at::isFloatingType(p.scalar_type()) && p.layout() == at::kStrided, op,
                ": params[", i, "] must be a dense real floating-point tensor");
    TORCH_CHECK(grads[i].layout() == at::kStrided && grads[i].device() == device &&
                    grads[i].scalar_type() == p.scalar_type() && grads[i].sizes() == p.sizes(),
                op, ": grads[", i, "] must be a dense ", p.scalar_type(), " tensor of shape ",
                shape_str(sizes_of(p)), " on ", device);
  }
}

void check_lstm_tensors(const char* op, at::TensorList params, at::TensorList grads,
                        at::TensorList momentum, at::TensorList rms, const at::Device& device) {
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && momentum.size() == n && rms.size() == n, op,
              ": params, grads, momentum and rms must have the same length, got ", n, ", ",
              grads.size(), ", ", momentum.size(), ", ", rms.size());
  check_params_and_grads(op, params, grads, device);
  for (size_t i = 0; i < n; ++i) {
    check_state(op, momentum[i], "momentum", i, params[i], with_channels(sizes_of(params[i])));
    check_state(op, rms[i], "rms", i, params[i], sizes_of(params[i]));
  }
}
}  // namespace

void check_velo_lstm_input_inputs(at::TensorList params, at::TensorList grads,
                                  at::TensorList momentum, at::TensorList rms,
                                  const at::Tensor& loss_features, const at::Tensor& iteration,
                                  double num_steps) {
  constexpr const char* op = "velo_lstm_input";
  const auto device = params.empty() ? loss_features.device() : params[0].device();
  check_loss_inputs(op, loss_features, iteration, num_steps, device);
  check_lstm_tensors(op, params, grads, momentum, rms, device);
}


void check_celo_adam_inputs(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                            at::TensorList exp_avg_sq, const at::Tensor& lr,
                            const at::Tensor& lr_mult, const at::Tensor& iteration,
                            const at::Tensor& skip, double step_mult, double epsilon) {
  constexpr const char* op = "celo_adam_step_";
  const size_t n = params.size();
  TORCH_CHECK(grads.size() == n && exp_avg.size() == n && exp_avg_sq.size() == n, op,
              ": params, grads, exp_avg and exp_avg_sq must have the same length, got ", n, ", ",
              grads.size(), ", ", exp_avg.size(), ", ", exp_avg_sq.size());
  TORCH_CHECK(std::isfinite(step_mult) && std::isfinite(epsilon) && epsilon >= 0, op,
              ": step_mult must be finite and epsilon finite and >= 0, got ", step_mult, " and ",
              epsilon);
  const auto device = n > 0 ? params[0].device() : lr_mult.device();
  check_lr(op, lr, device);
  check_float_tensor(op, "lr_mult", lr_mult, {static_cast<int64_t>(n)}, device);
  TORCH_CHECK(iteration.numel() == 1 && iteration.scalar_type() == at::kFloat &&
                  iteration.device() == device,
              op, ": iteration must be a float32 tensor with one element on ", device, ", got ",
              iteration.scalar_type(), " of shape ", shape_str(sizes_of(iteration)), " on ",
              iteration.device());
  check_skip(op, skip, device);
  check_params_and_grads(op, params, grads, device);
  for (size_t i = 0; i < n; ++i) {
    check_state(op, exp_avg[i], "exp_avg", i, params[i], sizes_of(params[i]));
    check_state(op, exp_avg_sq[i], "exp_avg_sq", i, params[i], sizes_of(params[i]));
  }
}

void check_velo_lstm_rows_inputs(const at::Tensor& loss_features, const at::Tensor& iteration,
                                 double num_steps, const at::Tensor& sums,
                                 const at::Tensor& spreads, c10::IntArrayRef numels,
                                 c10::IntArrayRef dims) {
  constexpr const char* op = "velo_lstm_rows";
  const auto device = loss_features.device();
  check_loss_inputs(op, loss_features, iteration, num_steps, device);
  const int64_t T = static_cast<int64_t>(numels.size());
  TORCH_CHECK(static_cast<int64_t>(dims.size()) == T, op, ": numels and dims must have the "
              "same length, got ", T, " and ", dims.size());
  for (const auto* t : {&sums, &spreads}) {
    TORCH_CHECK(t->scalar_type() == at::kDouble && t->is_contiguous() &&
                    sizes_of(*t) == std::vector<int64_t>({T, 6}) && t->device() == device,
                op, ": ", t == &sums ? "sums" : "spreads", " must be a contiguous float64 "
                "tensor of shape [", T, ", 6] on ", device, ", got ", t->scalar_type(),
                " of shape ", shape_str(sizes_of(*t)), " on ", t->device());
  }
  for (int64_t i = 0; i < T; ++i)
    TORCH_CHECK(numels[i] >= 0 && dims[i] >= 0, op, ": numels[", i, "] and dims[", i,
                "] must be >= 0, got ", numels[i], " and ", dims[i]);
}

void check_velo_lstm_moments_inputs(at::TensorList params, at::TensorList grads,
                                    at::TensorList momentum, at::TensorList rms,
                                    const c10::optional<at::Tensor>& momentum_means) {
  constexpr const char* op = "velo_lstm_moments";
  if (params.empty()) return;
  const auto device = params[0].device();
  check_lstm_tensors(op, params, grads, momentum, rms, device);
  if (momentum_means.has_value()) {
    const auto& mu = *momentum_means;
    const std::vector<int64_t> shape{static_cast<int64_t>(params.size()), kMomentumChannels};
    TORCH_CHECK(mu.scalar_type() == at::kDouble && sizes_of(mu) == shape && mu.is_contiguous() &&
                    mu.device() == device,
                op, ": momentum_means must be a contiguous float64 tensor of shape ",
                shape_str(shape), " on ", device, ", got ", mu.scalar_type(), " of shape ",
                shape_str(sizes_of(mu)), " on ", mu.device());
  }
}

}  // namespace lo_ops
