// CPU kernels of the phase ops (lo_ops.cpp): small_fc_lopt's and VeLO's step for parameters
// that may be shards of larger tensors, in four calls separated by the sums over whole
// tensors. They run the passes of adafactor_mlp_cpu.h: phase 1 and 2 are pass 1 with its
// means taken apart into sums (written out) and means (from the complete sums), phase 3 is
// pass 2, phase 4 is pass 3. The per-tensor scratch (rsqrt of r and c, row and column factors)
// does not outlive a call; phases 3 and 4 rebuild it from the state and the row sums. On whole
// tensors the four phases give the same numbers as small_fc_lopt_step_ / velo_step_.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../small_fc_lopt_math.h"
#include "../velo_math.h"
#include "adafactor_mlp_cpu.h"

namespace lo_ops {
namespace {

std::vector<int64_t> sizes_of(const at::Tensor& t) { return t.sizes().vec(); }

// The scratch of a factored tensor (see TensorWork) from its updated r and c and the complete
// sums of r over its copy of d1 (`row_sums`, [3, *S without d0 and d1]).
template <class P>
void scratch_from_state(cpu::TensorWork<P>& w, const double* row_sums) {
  const auto& geo = w.info.geo;
  const int64_t rs = geo.row_numel(), cs = geo.col_numel(), pq = geo.drop_pq_numel();
  const double d1_len = static_cast<double>(w.info.d1_total);
  for (int k = 0; k < kFactoredChannels; ++k) {
    const float* r = w.row + k * rs;
    for (int64_t e = 0; e < rs; ++e) {
      const float mean = static_cast<float>(row_sums[k * pq + row_sum_index(geo, e)] / d1_len);
      w.row_rsqrt[k * rs + e] = accumulator_rsqrt(r[e]);
      w.row_fac[k * rs + e] = row_factor(r[e], mean);
    }
    const float* c = w.col + k * cs;
    for (int64_t e = 0; e < cs; ++e) {
      w.col_rsqrt[k * cs + e] = accumulator_rsqrt(c[e]);
      w.col_fac[k * cs + e] = col_factor(c[e]);
    }
  }
}

template <class P>
void rebuild_scratch(std::vector<cpu::TensorWork<P>>& work, at::TensorList row_sums) {
  cpu::parallel_items(
      static_cast<int64_t>(work.size()),
      [&](int64_t i) {
        const auto& info = work[i].info;
        return info.factored ? info.geo.row_numel() + info.geo.col_numel() : int64_t{0};
      },
      [&](int64_t i) {
        auto& w = work[i];
        if (w.info.factored && w.info.numel > 0)
          scratch_from_state(w, row_sums[w.info.state_index].template data_ptr<double>());
      });
}

// -- phase 1 -----------------------------------------------------------------------------------
std::vector<at::Tensor> factored_gsq_sums_cpu(at::TensorList grads,
                                              c10::IntArrayRef global_geometry,
                                              double grad_clip, bool nan_to_num) {
  const auto infos = check_shards("factored_gsq_sums", "grads", grads, global_geometry);
  std::vector<at::Tensor> out, g(grads.size());
  struct Target {
    size_t grad;
    double* out;
  };
  std::vector<Target> targets;
  std::vector<cpu::ReduceTask> tasks;
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& info = infos[i];
    if (!info.factored) continue;
    const auto& geo = info.geo;
    const auto s = sizes_of(grads[i]);
    g[i] = grads[i].contiguous();
    for (const int axis : {geo.d0, geo.d1}) {
      out.push_back(at::zeros(drop_axis(s, axis), grads[i].options().dtype(at::kDouble)));
      if (info.numel == 0) continue;
      const int target = static_cast<int>(targets.size());
      targets.push_back({i, out.back().data_ptr<double>()});
      // Over P: view [A, P, B*Q*C]; over Q: view [A*P*B, Q, C].
      if (axis == std::min(geo.d0, geo.d1))
        cpu::add_reduce_tasks(tasks, target, 0, geo.A, geo.P, geo.B * geo.Q * geo.C);
      else
        cpu::add_reduce_tasks(tasks, target, 0, geo.A * geo.P * geo.B, geo.Q, geo.C);
    }
  }
  if (tasks.empty()) return out;
  const cpu::CpuIsa isa = cpu::select_isa();
  const float clip_value = static_cast<float>(grad_clip);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grads[0].scalar_type(),
                                  "factored_gsq_sums_cpu", [&] {
    cpu::parallel_items(
        static_cast<int64_t>(tasks.size()),
        [&](int64_t i) { return (tasks[i].o1 - tasks[i].o0) * tasks[i].R * (tasks[i].i1 - tasks[i].i0); },
        [&](int64_t i) {
          const auto& t = tasks[i];
          const Target& target = targets[t.tensor];
          cpu::gsq_sum_task_for<scalar_t>(isa, t, g[target.grad].data_ptr<scalar_t>(), clip_value,
                                          nan_to_num, target.out);
        });
  });
  return out;
}

// -- phase 2 -----------------------------------------------------------------------------------
at::Tensor factored_update_cpu(at::TensorList params, at::TensorList fac_row,
                                            at::TensorList fac_col, at::TensorList gsq_sums,
                                            const at::Tensor& decays,
                                            const c10::optional<at::Tensor>& skip,
                                            c10::IntArrayRef global_geometry) {
  const auto infos = check_factored_update_inputs(params, fac_row, fac_col, gsq_sums, decays, skip,
                                                  global_geometry);
  if (params.empty()) return at::zeros({0}, decays.options().dtype(at::kDouble));
  const bool frozen = skip.has_value() && *skip->data_ptr<bool>();
  const float* decay_values = decays.data_ptr<float>();
  const int64_t decays_stride = table_row_stride(decays, kDecays);
  std::vector<size_t> factored;  // the tensors with ndim >= 2
  std::vector<int64_t> updated;  // those of them with elements (an empty tensor keeps r and c)
  for (size_t i = 0; i < params.size(); ++i) {
    if (!infos[i].factored) continue;
    if (infos[i].total_numel > 0 && !frozen) updated.push_back(static_cast<int64_t>(factored.size()));
    factored.push_back(i);
  }
  // r and c take the means of g^2 over the whole sizes of d0 and d1.
  const cpu::CpuIsa isa = cpu::select_isa();
  cpu::parallel_items(
      static_cast<int64_t>(updated.size()),
      [&](int64_t u) {
        const auto& geo = infos[factored[updated[u]]].geo;
        return geo.row_numel() + geo.col_numel();
      },
      [&](int64_t u) {
        const int64_t k = updated[u];
        const size_t i = factored[k];
        const auto& info = infos[i];
        const float* d = decay_values + i * decays_stride;
        const double counts[2] = {static_cast<double>(info.d0_total),
                                  static_cast<double>(info.d1_total)};
        float* states[2] = {fac_row[k].data_ptr<float>(), fac_col[k].data_ptr<float>()};
        const int64_t sizes[2] = {info.geo.row_numel(), info.geo.col_numel()};
        for (int side = 0; side < 2; ++side) {
          const double* sums = gsq_sums[2 * k + side].data_ptr<double>();
          for (int c = 0; c < kFactoredChannels; ++c)
            cpu::ema_of_sums_for(isa, states[side] + c * sizes[side], sums, sizes[side],
                                 counts[side], clip01(d[kDecayFactored + c]));
        }
      });
  // The sums of r over its copy of d1, at offset[k] of the output for factored tensor k.
  std::vector<cpu::ReduceTask> tasks;
  std::vector<int64_t> offset(factored.size() + 1, 0);
  for (size_t k = 0; k < factored.size(); ++k) {
    const auto& geo = infos[factored[k]].geo;
    offset[k + 1] = offset[k] + kFactoredChannels * geo.drop_pq_numel();
    if (geo.row_numel() > 0) cpu::add_row_sum_tasks(tasks, static_cast<int>(k), geo, 2);
  }
  at::Tensor out = at::zeros({offset.back()}, decays.options().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  cpu::parallel_items(
      static_cast<int64_t>(tasks.size()),
      [&](int64_t i) { return (tasks[i].o1 - tasks[i].o0) * tasks[i].R * (tasks[i].i1 - tasks[i].i0); },
      [&](int64_t i) {
        const auto& t = tasks[i];
        const auto& geo = infos[factored[t.tensor]].geo;
        cpu::row_sum_task_for(isa, t, fac_row[t.tensor].data_ptr<float>(), geo.row_numel(),
                              geo.drop_pq_numel(), dst + offset[t.tensor]);
      });
  return out;
}

// -- phases 3 and 4 ----------------------------------------------------------------------------
template <class P, typename Setup>
at::Tensor feature_sums_bucket(const std::vector<TensorInfo>& infos, at::TensorList params,
                               at::TensorList grads, at::TensorList momentum, at::TensorList rms,
                               at::TensorList fac_row, at::TensorList fac_col,
                               at::TensorList fac_diag, at::TensorList row_sums, Setup setup) {
  constexpr int F = P::kFeatures;
  const int64_t T = static_cast<int64_t>(params.size());
  at::Tensor out = at::zeros({T, F}, params[0].options().dtype(at::kDouble));
  std::vector<cpu::TensorWork<P>> work;
  const at::Tensor scratch =
      cpu::prepare_work(work, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < work.size(); ++i) setup(i, work[i]);
  rebuild_scratch(work, row_sums);
  double* dst = out.data_ptr<double>();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "feature_sums_cpu", [&] {
    const cpu::CpuIsa isa = cpu::select_isa();
    const std::vector<cpu::Chunk> chunks = cpu::make_chunks(work);
    const std::vector<double> totals = cpu::element_pass<P, scalar_t>(work, chunks, isa);
    std::copy(totals.begin(), totals.end(), dst);
  });
  // (A shard of no elements adds nothing; its scratch was not built.)
  for (int64_t i = 0; i < T; ++i)
    if (work[i].info.numel > 0) cpu::set_accumulator_sums(work[i], dst + i * F);
  return out;
}

template <class P, typename Setup>
void apply_bucket(const std::vector<TensorInfo>& infos, at::TensorList params,
                  at::TensorList grads, at::TensorList momentum, at::TensorList rms,
                  at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
                  at::TensorList row_sums, const at::Tensor& feature_sums, const at::Tensor& lr,
                  double weight_decay, double step_mult, double exp_mult, Setup setup) {
  const float lr_value = lr.item<float>();
  std::vector<cpu::TensorWork<P>> work;
  const at::Tensor scratch =
      cpu::prepare_work(work, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < work.size(); ++i) setup(i, work[i]);
  rebuild_scratch(work, row_sums);
  const double* given = feature_sums.data_ptr<double>();
  std::vector<double> sums(given, given + feature_sums.numel());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "apply_cpu", [&] {
    const cpu::CpuIsa isa = cpu::select_isa();
    const std::vector<cpu::Chunk> chunks = cpu::make_chunks(work);
    cpu::update_pass<P, scalar_t>(work, chunks, isa, sums.data(), false, lr_value, weight_decay,
                                  step_mult, exp_mult);
  });
  cpu::finish_work(work, params);
}

at::Tensor small_fc_lopt_feature_sums_cpu(at::TensorList params, at::TensorList grads,
                                          at::TensorList momentum, at::TensorList rms,
                                          at::TensorList fac_row, at::TensorList fac_col,
                                          at::TensorList fac_diag, at::TensorList row_sums,
                                          const at::Tensor& decays,
                                          const c10::optional<at::Tensor>& skip,
                                          c10::IntArrayRef global_geometry, bool nan_to_num) {
  constexpr const char* op = "small_fc_lopt_feature_sums_";
  const auto infos = check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col,
                                              fac_diag, global_geometry);
  const int64_t T = static_cast<int64_t>(params.size());
  if (skip.has_value()) check_skip(op, *skip, T > 0 ? params[0].device() : skip->device());
  if (T == 0 || (skip.has_value() && *skip->data_ptr<bool>()))
    return at::zeros({T, small_fc_lopt::kFeatures}, decays.options().dtype(at::kDouble));
  check_decays(op, decays, T, params[0].device());
  check_row_sums(op, row_sums, infos, params);
  const float* d = decays.data_ptr<float>();
  const int64_t stride = table_row_stride(decays, kDecays);
  return feature_sums_bucket<small_fc_lopt::Policy>(
      infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums,
      [&](size_t i, cpu::TensorWork<small_fc_lopt::Policy>& w) {
        w.decays = d + i * stride;
        w.nan_to_num = nan_to_num;
      });
}

void small_fc_lopt_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                             at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                             at::TensorList fac_diag, at::TensorList state_steps,
                             const at::Tensor& lr, const at::Tensor& meta_weights,
                             const at::Tensor& decays, const c10::optional<at::Tensor>& skip,
                             at::TensorList row_sums, const at::Tensor& feature_sums,
                             c10::IntArrayRef global_geometry, double weight_decay,
                             double step_mult, double exp_mult, double step_scale,
                             bool nan_to_num) {
  constexpr const char* op = "small_fc_lopt_apply_";
  const auto infos = check_small_fc_lopt_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                                fac_diag, state_steps, lr, meta_weights, decays,
                                                global_geometry);
  const int64_t T = static_cast<int64_t>(params.size());
  if (skip.has_value()) check_skip(op, *skip, T > 0 ? params[0].device() : skip->device());
  if (T == 0 || (skip.has_value() && *skip->data_ptr<bool>())) return;
  check_row_sums(op, row_sums, infos, params);
  check_feature_sums(op, feature_sums, T, small_fc_lopt::kFeatures, params[0].device());
  const float* weights = meta_weights.data_ptr<float>();
  const float* d = decays.data_ptr<float>();
  const int64_t weights_stride = table_row_stride(meta_weights, small_fc_lopt::kPackedWeights);
  const int64_t decays_stride = table_row_stride(decays, kDecays);
  apply_bucket<small_fc_lopt::Policy>(
      infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums, feature_sums, lr,
      weight_decay, step_mult, exp_mult, [&](size_t i, cpu::TensorWork<small_fc_lopt::Policy>& w) {
        w.weights = weights + i * weights_stride;
        w.decays = d + i * decays_stride;
        w.t = *state_steps[i].data_ptr<float>();
        w.lr_mult = static_cast<float>(step_scale);
        w.nan_to_num = nan_to_num;
      });
  for (const auto& step : state_steps) *step.data_ptr<float>() += 1.0f;
}

at::Tensor velo_feature_sums_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList momentum, at::TensorList rms,
                                 at::TensorList fac_row, at::TensorList fac_col,
                                 at::TensorList fac_diag, at::TensorList row_sums,
                                 const at::Tensor& skip, c10::IntArrayRef global_geometry) {
  constexpr const char* op = "velo_feature_sums_";
  const auto infos = check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col,
                                              fac_diag, global_geometry);
  const int64_t T = static_cast<int64_t>(params.size());
  check_skip(op, skip, T > 0 ? params[0].device() : skip.device());
  if (T == 0 || *skip.data_ptr<bool>())
    return at::zeros({T, velo::kFeatures}, skip.options().dtype(at::kDouble));
  check_row_sums(op, row_sums, infos, params);
  return feature_sums_bucket<velo::Policy>(infos, params, grads, momentum, rms, fac_row, fac_col,
                                           fac_diag, row_sums,
                                           [](size_t, cpu::TensorWork<velo::Policy>&) {});
}

void velo_apply_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                    at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                    at::TensorList fac_diag, const at::Tensor& lr, const at::Tensor& mlp_weights,
                    const at::Tensor& lr_mult, const at::Tensor& skip, at::TensorList row_sums,
                    const at::Tensor& feature_sums, c10::IntArrayRef global_geometry,
                    double weight_decay, double step_mult, double exp_mult) {
  constexpr const char* op = "velo_apply_";
  const auto infos = check_velo_step_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                            fac_diag, lr, mlp_weights, lr_mult, skip,
                                            global_geometry, op);
  const int64_t T = static_cast<int64_t>(params.size());
  if (T == 0 || *skip.data_ptr<bool>()) return;
  check_row_sums(op, row_sums, infos, params);
  check_feature_sums(op, feature_sums, T, velo::kFeatures, params[0].device());
  const float* weights = mlp_weights.data_ptr<float>();
  const float* mult = lr_mult.data_ptr<float>();
  apply_bucket<velo::Policy>(infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag,
                             row_sums, feature_sums, lr, weight_decay, step_mult, exp_mult,
                             [&](size_t i, cpu::TensorWork<velo::Policy>& w) {
                               w.weights = weights + i * velo::kPackedWeights;
                               w.lr_mult = mult[i];
                             });
}

}  // namespace

TORCH_LIBRARY_IMPL(lo_ops, CPU, m) {
  m.impl("factored_gsq_sums", &factored_gsq_sums_cpu);
  m.impl("factored_update_", &factored_update_cpu);
  m.impl("small_fc_lopt_feature_sums_", &small_fc_lopt_feature_sums_cpu);
  m.impl("small_fc_lopt_apply_", &small_fc_lopt_apply_cpu);
  m.impl("velo_feature_sums_", &velo_feature_sums_cpu);
  m.impl("velo_apply_", &velo_apply_cpu);
}

}  // namespace lo_ops
