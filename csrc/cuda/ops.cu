// CUDA bindings of the lo_ops ops: argument checks (../checks.h), scratch from the caching
// allocator, the kernels of adafactor_mlp.cuh and velo_stats.cuh launched on the current
// stream under a device guard (launch.cuh). Only device-generic torch headers are used
// (c10::DeviceGuard, the stream's native handle), so this file compiles against any torch
// build's headers, and as host C++ under the CUDA emulator (lo_ops.testing).
#include <ATen/ATen.h>
#include <c10/core/DeviceGuard.h>
#include <torch/library.h>

#include <cuda_runtime.h>

#include <vector>

#include "../checks.h"
#include "../small_fc_lopt_math.h"
#include "../velo_math.h"
#include "adafactor_mlp.cuh"
#include "celo_adam.cuh"
#include "launch.cuh"
#include "velo_stats.cuh"

namespace lo_ops {
namespace cuda {
namespace {

void check_launch(const char* what) {
  const cudaError_t err = cudaGetLastError();
  TORCH_CHECK(err == cudaSuccess, "lo_ops: launching ", what, " failed: ", cudaGetErrorString(err));
}

int64_t blocks_for(int64_t threads) { return (threads + kThreads - 1) / kThreads; }

// Calls launch(table) for consecutive groups of at most kMaxTensors tensors with items(t) > 0
// work items each (`table.start` holds the prefix sums).
template <typename Tab, int Max, typename T, typename Items, typename Launch>
void for_each_table(const std::vector<T>& tensors, Items items, Launch launch) {
  Tab table{};
  table.count = 0;
  table.start[0] = 0;
  for (const T& t : tensors) {
    const int64_t n = items(t);
    if (n == 0) continue;
    table.t[table.count] = t;
    table.start[table.count + 1] = table.start[table.count] + n;
    if (++table.count == Max) {
      launch(table);
      table.count = 0;
    }
  }
  if (table.count > 0) launch(table);
}

// The work of one per-element op call: device pointers of every tensor, its scratch, and the
// contiguous copies of non-contiguous parameters (written back by finish()).
template <class P>
struct Bucket {
  std::vector<TensorArgs> tensors;
  std::vector<at::Tensor> keep;  // contiguous copies and scratch, alive until the launches end
  at::TensorList params;
  std::vector<at::Tensor> contiguous;

  Bucket(const std::vector<TensorInfo>& infos, at::TensorList params_, at::TensorList grads,
         at::TensorList momentum, at::TensorList rms, at::TensorList fac_row,
         at::TensorList fac_col, at::TensorList fac_diag)
      : params(params_) {
    constexpr int F = P::kFeatures, H = P::kHidden;
    int64_t scratch = 0, moment_scratch = 0;
    for (const auto& info : infos) {
      scratch += H * F + H + 1 + ((info.numel + kChunk - 1) / kChunk) * F;
      if (info.factored) {
        scratch += (2 * kFactoredChannels + H) * (info.geo.row_numel() + info.geo.col_numel());
        moment_scratch += moment_partials_size(info.geo);
      }
    }
    at::Tensor buffer = uninitialized({scratch}, params[0].options().dtype(at::kFloat));
    at::Tensor moment_buffer = uninitialized({moment_scratch}, params[0].options().dtype(at::kDouble));
    keep.push_back(buffer);
    keep.push_back(moment_buffer);
    float* sp = buffer.data_ptr<float>();
    double* mp = moment_buffer.data_ptr<double>();
    for (size_t i = 0; i < params.size(); ++i) {
      const TensorInfo& info = infos[i];
      contiguous.push_back(params[i].contiguous());
      const at::Tensor g = grads[i].contiguous();
      keep.push_back(g);
      TensorArgs t{};
      t.p = contiguous.back().data_ptr();
      t.g = g.data_ptr();
      t.m = momentum[i].data_ptr<float>();
      t.v = rms[i].data_ptr<float>();
      t.numel = info.numel;
      t.total_numel = info.total_numel;
      t.d0_total = info.d0_total;
      t.d1_total = info.d1_total;
      t.chunks = (info.numel + kChunk - 1) / kChunk;
      t.factored = info.factored ? 1 : 0;
      t.fold = sp;
      sp += H * F + H + 1;
      t.partials = sp;
      sp += t.chunks * F;
      if (info.factored) {
        t.geo = info.geo;
        t.row = fac_row[info.state_index].data_ptr<float>();
        t.col = fac_col[info.state_index].data_ptr<float>();
        const int64_t rs = info.geo.row_numel(), cs = info.geo.col_numel();
        t.row_rsqrt = sp;
        t.row_fac = t.row_rsqrt + kFactoredChannels * rs;
        t.col_rsqrt = t.row_fac + kFactoredChannels * rs;
        t.col_fac = t.col_rsqrt + kFactoredChannels * cs;
        t.row_contrib = t.col_fac + kFactoredChannels * cs;
        t.col_contrib = t.row_contrib + H * rs;
        sp = t.col_contrib + H * cs;
        t.moment_partials = mp;
        mp += moment_partials_size(info.geo);
      } else {
        t.row = fac_diag[info.state_index].data_ptr<float>();
      }
      tensors.push_back(t);
    }
  }

  void finish() {
    for (size_t i = 0; i < params.size(); ++i)
      if (!params[i].is_same(contiguous[i])) params[i].copy_(contiguous[i]);
  }
};

// The four passes over a bucket, launched table by table on `stream`. With `found` (a zeroed
// flag; then `skip` must be it), the gradients are checked first: moment_partials_kernel
// checks those it reads, nonfinite_kernel the others, and a NaN or an infinity anywhere sets
// the flag, which every pass that changes something reads as its skip.
template <class P, typename S>
void run_passes(const std::vector<TensorArgs>& tensors, const float* lr,
                float weight_decay, float step_mult, float exp_mult, const bool* skip,
                bool* found, cudaStream_t stream) {
  const auto factored = [](const TensorArgs& t) { return t.factored && t.numel > 0; };
  const auto chunk_items = [](const TensorArgs& t) { return t.chunks; };
  if (found != nullptr) {
    const auto unfactored_chunks = [&](const TensorArgs& t) { return factored(t) ? 0 : t.chunks; };
    for_each_table<Table, kMaxTensors>(tensors, unfactored_chunks, [&](const Table& table) {
      launch(nonfinite_kernel<S>, table.start[table.count], kThreads, stream, table, found);
    });
    check_launch("nonfinite_kernel");
  }
  const auto moment_items = [&](const TensorArgs& t) { return factored(t) ? moment_blocks(t.geo) : 0; };
  for_each_table<Table, kMaxTensors>(tensors, moment_items, [&](const Table& table) {
    launch(moment_partials_kernel<P, S>, table.start[table.count], kThreads, stream, table,
           found != nullptr ? nullptr : skip, found);
  });
  check_launch("moment_partials_kernel");
  const auto output_items = [&](const TensorArgs& t) {
    return factored(t) ? t.geo.row_numel() + t.geo.col_numel() : 0;
  };
  for_each_table<Table, kMaxTensors>(tensors, output_items, [&](const Table& table) {
    launch(moment_combine_kernel<P>, blocks_for(table.start[table.count]), kThreads, stream, table, skip);
  });
  check_launch("moment_combine_kernel");
  const auto slice_items = [&](const TensorArgs& t) {
    return factored(t) ? t.geo.row_numel() / row_slices(t.geo).R : 0;
  };
  for_each_table<Table, kMaxTensors>(tensors, slice_items, [&](const Table& table) {
    launch(row_factor_kernel, table.start[table.count], kThreads, stream, table, skip);
  });
  check_launch("row_factor_kernel");
  for_each_table<Table, kMaxTensors>(tensors, chunk_items, [&](const Table& table) {
    launch(accumulate_kernel<P, S>, table.start[table.count], kThreads, stream, table, skip);
  });
  check_launch("accumulate_kernel");
  const auto one = [](const TensorArgs&) { return int64_t{1}; };
  for_each_table<Table, kMaxTensors>(tensors, one, [&](const Table& table) {
    launch(fold_kernel<P>, table.count, kThreads, stream, table, step_mult, skip);
  });
  check_launch("fold_kernel");
  const auto contrib_items = [&](const TensorArgs& t) { return factored(t) ? contrib_blocks(t.geo) : 0; };
  for_each_table<Table, kMaxTensors>(tensors, contrib_items, [&](const Table& table) {
    launch(contrib_kernel<P>, table.start[table.count], kThreads, stream, table, skip);
  });
  check_launch("contrib_kernel");
  for_each_table<Table, kMaxTensors>(tensors, chunk_items, [&](const Table& table) {
    launch(update_kernel<P, S>, table.start[table.count], kThreads, stream, table, lr, weight_decay,
           exp_mult, skip);
  });
  check_launch("update_kernel");
}

// Calls fn with the CUDA storage type of `dtype` as a null pointer of that type.
template <typename F>
void dispatch_storage(at::ScalarType dtype, const char* op, F fn) {
  switch (dtype) {
    case at::kFloat:
      return fn(static_cast<float*>(nullptr));
    case at::kDouble:
      return fn(static_cast<double*>(nullptr));
    case at::kHalf:
      return fn(static_cast<__half*>(nullptr));
    case at::kBFloat16:
      return fn(static_cast<__nv_bfloat16*>(nullptr));
    default:
      TORCH_CHECK(false, op, ": parameters of dtype ", dtype, " are not supported on CUDA");
  }
}

// One op call over a bucket: scratch and tables, setup(i, tensors[i]) for P's per-tensor
// pointers (weights, decays, step count, lr_mult), the passes, and the write-back of
// non-contiguous parameters. `skip` may be null; with `found` (see run_passes) it is found.
template <class P, typename Setup>
void run_bucket(const std::vector<TensorInfo>& infos, at::TensorList params,
                at::TensorList grads, at::TensorList momentum, at::TensorList rms,
                at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
                const at::Tensor& lr, double weight_decay, double step_mult,
                double exp_mult, const bool* skip, bool* found, const char* op,
                Setup setup) {
  const c10::DeviceGuard guard(params[0].device());
  const cudaStream_t stream = current_stream(params[0].device());
  Bucket<P> bucket(infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < params.size(); ++i) setup(i, bucket.tensors[i]);
  const at::Tensor lr32 = lr.to(at::kFloat);
  dispatch_storage(params[0].scalar_type(), op, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    run_passes<P, S>(bucket.tensors, lr32.data_ptr<float>(),
                     static_cast<float>(weight_decay), static_cast<float>(step_mult),
                     static_cast<float>(exp_mult), skip, found, stream);
  });
  bucket.finish();
}

void small_fc_lopt_step_cuda(at::TensorList params, at::TensorList grads,
                             at::TensorList momentum, at::TensorList rms,
                             at::TensorList fac_row, at::TensorList fac_col,
                             at::TensorList fac_diag, at::TensorList state_steps,
                             const at::Tensor& lr, const at::Tensor& meta_weights,
                             const at::Tensor& decays, double weight_decay, double step_mult,
                             double exp_mult, const c10::optional<at::Tensor>& skip,
                             double step_scale, bool nan_to_num) {
  const auto infos = check_small_fc_lopt_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                                fac_diag, state_steps, lr, meta_weights, decays);
  if (params.empty()) return;
  if (skip.has_value()) check_skip("small_fc_lopt_step_", *skip, params[0].device());
  const float* weights = meta_weights.data_ptr<float>();
  const float* decay_values = decays.data_ptr<float>();
  const int64_t weights_stride = table_row_stride(meta_weights, small_fc_lopt::kPackedWeights);
  const int64_t decays_stride = table_row_stride(decays, kDecays);
  // Without skip, a gradient holding a NaN or an infinity leaves everything unchanged and the
  // step uncounted: the flag is found on the device, so a captured step keeps the rule. With
  // nan_to_num (μLO) the gradients are made finite instead.
  at::Tensor found;
  bool* found_ptr = nullptr;
  if (!skip.has_value() && !nan_to_num) {
    found = at::zeros({}, params[0].options().dtype(at::kBool));
    found_ptr = found.data_ptr<bool>();
  }
  run_bucket<small_fc_lopt::Policy>(
      infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag, lr, weight_decay,
      step_mult, exp_mult, skip.has_value() ? skip->data_ptr<bool>() : found_ptr, found_ptr,
      "small_fc_lopt_step_", [&](size_t i, TensorArgs& t) {
        t.weights = weights + i * weights_stride;
        t.decays = decay_values + i * decays_stride;
        t.step = state_steps[i].data_ptr<float>();
        t.scale = static_cast<float>(step_scale);
        t.nan_to_num = nan_to_num ? 1 : 0;
      });
}

void velo_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                    at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                    at::TensorList fac_diag, const at::Tensor& lr, const at::Tensor& mlp_weights,
                    const at::Tensor& lr_mult, const at::Tensor& skip, double weight_decay,
                    double step_mult, double exp_mult) {
  const auto infos = check_velo_step_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                            fac_diag, lr, mlp_weights, lr_mult, skip);
  if (params.empty()) return;
  const float* weights = mlp_weights.data_ptr<float>();
  const float* mult = lr_mult.data_ptr<float>();
  run_bucket<velo::Policy>(infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag,
                           lr, weight_decay, step_mult, exp_mult, skip.data_ptr<bool>(), nullptr,
                           "velo_step_", [&](size_t i, TensorArgs& t) {
                             t.weights = weights + i * velo::kPackedWeights;
                             t.lr_mult = mult + i;
                           });
}

// The statistics kernels' view of a bucket: each tensor's (contiguous) pointers, numel, axes
// longer than 1 and first chunk; `keep` holds the contiguous copies, `chunks` counts the chunks.
std::vector<StatsTensor> stats_tensors(at::TensorList params, at::TensorList grads,
                                       at::TensorList momentum, at::TensorList rms,
                                       std::vector<at::Tensor>& keep, int64_t& chunks) {
  std::vector<StatsTensor> tensors;
  chunks = 0;
  for (size_t i = 0; i < params.size(); ++i) {
    keep.push_back(params[i].contiguous());
    keep.push_back(grads[i].contiguous());
    StatsTensor t{};
    t.p = keep[keep.size() - 2].data_ptr();
    t.g = keep.back().data_ptr();
    t.m = momentum[i].data_ptr<float>();
    t.v = rms[i].data_ptr<float>();
    t.numel = params[i].numel();
    t.first_chunk = chunks;
    t.index = static_cast<int64_t>(i);
    for (const int64_t s : params[i].sizes()) t.dims += s > 1 ? 1 : 0;
    chunks += (t.numel + kChunk - 1) / kChunk;
    tensors.push_back(t);
  }
  return tensors;
}

std::tuple<at::Tensor, at::Tensor> velo_lstm_input_cuda(at::TensorList params,
                                                        at::TensorList grads,
                                                        at::TensorList momentum,
                                                        at::TensorList rms,
                                                        const at::Tensor& loss_features,
                                                        const at::Tensor& iteration,
                                                        double num_steps) {
  check_velo_lstm_input_inputs(params, grads, momentum, rms, loss_features, iteration, num_steps);
  const int64_t T = static_cast<int64_t>(params.size());
  const c10::DeviceGuard guard(loss_features.device());
  at::Tensor X = uninitialized({T, velo::kLstmInputs}, loss_features.options());
  at::Tensor finite = uninitialized({}, loss_features.options().dtype(at::kBool));
  if (T == 0) {
    finite.fill_(true);
    return {X, finite};
  }
  const cudaStream_t stream = current_stream(loss_features.device());
  std::vector<at::Tensor> keep;
  int64_t chunks = 0;
  const std::vector<StatsTensor> tensors = stats_tensors(params, grads, momentum, rms, keep, chunks);
  at::Tensor moments = uninitialized(
      {std::max<int64_t>(chunks, 1) * static_cast<int64_t>(sizeof(velo::ChunkMoments))},
      loss_features.options().dtype(at::kByte));
  at::Tensor tensor_finite = uninitialized({T}, loss_features.options().dtype(at::kBool));
  auto* out = reinterpret_cast<velo::ChunkMoments*>(moments.data_ptr());
  const auto chunk_items = [](const StatsTensor& t) { return (t.numel + kChunk - 1) / kChunk; };
  dispatch_storage(params[0].scalar_type(), "velo_lstm_input", [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    for_each_table<StatsTable, kMaxStatsTensors>(tensors, chunk_items, [&](const StatsTable& table) {
      launch(chunk_moments_kernel<S>, table.start[table.count], kThreads, stream, table, out);
    });
  });
  check_launch("chunk_moments_kernel");
  const auto one = [](const StatsTensor&) { return int64_t{1}; };
  const at::Tensor iteration32 = iteration.to(at::kFloat);
  for_each_table<StatsTable, kMaxStatsTensors>(tensors, one, [&](const StatsTable& table) {
    launch(lstm_rows_kernel, table.count, kThreads, stream, 
        table, out, loss_features.data_ptr<float>(), iteration32.data_ptr<float>(),
        static_cast<float>(num_steps), X.data_ptr<float>(), tensor_finite.data_ptr<bool>());
  });
  check_launch("lstm_rows_kernel");
  launch(all_true_kernel, 1, kThreads, stream, tensor_finite.data_ptr<bool>(), T,
                                              finite.data_ptr<bool>());
  check_launch("all_true_kernel");
  return {X, finite};
}

// -- phase ops (parameters that may be shards; lo_ops.cpp) -----------------------------------------

const auto is_factored = [](const TensorArgs& t) { return t.factored && t.numel > 0; };

std::vector<at::Tensor> factored_gsq_sums_cuda(at::TensorList grads, c10::IntArrayRef global_geometry,
                                               double grad_clip, bool nan_to_num) {
  const auto infos = check_shards("factored_gsq_sums", "grads", grads, global_geometry);
  std::vector<at::Tensor> out;
  if (grads.empty()) return out;
  const c10::DeviceGuard guard(grads[0].device());
  const cudaStream_t stream = current_stream(grads[0].device());
  std::vector<at::Tensor> keep;
  std::vector<TensorArgs> tensors;
  int64_t moment_scratch = 0;
  for (const auto& info : infos)
    if (info.factored) moment_scratch += moment_partials_size(info.geo);
  at::Tensor moments = uninitialized({std::max<int64_t>(moment_scratch, 1)},
                                     grads[0].options().dtype(at::kDouble));
  double* mp = moments.data_ptr<double>();
  for (size_t i = 0; i < grads.size(); ++i) {
    const auto& info = infos[i];
    if (!info.factored) continue;
    const auto s = grads[i].sizes().vec();
    at::Tensor row = at::zeros(drop_axis(s, info.geo.d0), grads[i].options().dtype(at::kDouble));
    at::Tensor col = at::zeros(drop_axis(s, info.geo.d1), grads[i].options().dtype(at::kDouble));
    out.push_back(row);
    out.push_back(col);
    keep.push_back(grads[i].contiguous());
    TensorArgs t{};
    t.g = keep.back().data_ptr();
    t.numel = info.numel;
    t.geo = info.geo;
    t.factored = 1;
    t.grad_clip = static_cast<float>(grad_clip);
    t.nan_to_num = nan_to_num ? 1 : 0;
    t.gsq_row = row.data_ptr<double>();
    t.gsq_col = col.data_ptr<double>();
    t.moment_partials = mp;
    mp += moment_partials_size(info.geo);
    tensors.push_back(t);
  }
  using P = small_fc_lopt::Policy;  // (its gradient is g itself; grad_clip clips)
  dispatch_storage(grads[0].scalar_type(), "factored_gsq_sums", [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    const auto moment_items = [&](const TensorArgs& t) { return is_factored(t) ? moment_blocks(t.geo) : 0; };
    for_each_table<Table, kMaxTensors>(tensors, moment_items, [&](const Table& table) {
      launch(moment_partials_kernel<P, S>, table.start[table.count], kThreads, stream, table, nullptr,
             nullptr);
    });
    check_launch("moment_partials_kernel");
  });
  const auto output_items = [&](const TensorArgs& t) {
    return is_factored(t) ? t.geo.row_numel() + t.geo.col_numel() : 0;
  };
  for_each_table<Table, kMaxTensors>(tensors, output_items, [&](const Table& table) {
    launch(moment_combine_kernel<P>, blocks_for(table.start[table.count]), kThreads, stream, table, nullptr);
  });
  check_launch("moment_combine_kernel");
  return out;
}

at::Tensor factored_update_cuda(at::TensorList params, at::TensorList fac_row, at::TensorList fac_col,
                                at::TensorList gsq_sums, const at::Tensor& decays,
                                const c10::optional<at::Tensor>& skip, c10::IntArrayRef global_geometry) {
  const auto infos = check_factored_update_inputs(params, fac_row, fac_col, gsq_sums, decays, skip,
                                                  global_geometry);
  if (params.empty()) return at::zeros({0}, decays.options().dtype(at::kDouble));
  const auto device = params[0].device();
  const c10::DeviceGuard guard(device);
  const cudaStream_t stream = current_stream(device);
  const float* decay_values = decays.data_ptr<float>();
  const int64_t decays_stride = table_row_stride(decays, kDecays);
  std::vector<TensorArgs> tensors;
  int64_t total = 0;
  for (size_t i = 0; i < params.size(); ++i)
    if (infos[i].factored) total += kFactoredChannels * infos[i].geo.drop_pq_numel();
  at::Tensor out = at::zeros({total}, decays.options().dtype(at::kDouble));
  double* dst = out.data_ptr<double>();
  for (size_t i = 0; i < params.size(); ++i) {
    const auto& info = infos[i];
    if (!info.factored) continue;
    const int64_t k = info.state_index;
    TensorArgs t{};
    t.row = fac_row[k].data_ptr<float>();
    t.col = fac_col[k].data_ptr<float>();
    t.decays = decay_values + i * decays_stride;
    t.numel = info.total_numel;  // r and c are kept while the whole tensor has elements
    t.geo = info.geo;
    t.factored = 1;
    t.d0_total = info.d0_total;
    t.d1_total = info.d1_total;
    t.gsq_row = gsq_sums[2 * k].data_ptr<double>();
    t.gsq_col = gsq_sums[2 * k + 1].data_ptr<double>();
    t.row_sums = dst;
    dst += kFactoredChannels * info.geo.drop_pq_numel();
    tensors.push_back(t);
  }
  const bool* skip_ptr = skip.has_value() ? skip->data_ptr<bool>() : nullptr;
  const auto output_items = [&](const TensorArgs& t) {
    return is_factored(t) ? t.geo.row_numel() + t.geo.col_numel() : 0;
  };
  for_each_table<Table, kMaxTensors>(tensors, output_items, [&](const Table& table) {
    launch(factored_from_sums_kernel<small_fc_lopt::Policy>, blocks_for(table.start[table.count]),
           kThreads, stream, table, skip_ptr);
  });
  check_launch("factored_from_sums_kernel");
  const auto slice_items = [&](const TensorArgs& t) {
    return t.geo.row_numel() > 0 ? t.geo.row_numel() / row_slices(t.geo).R : 0;
  };
  for_each_table<Table, kMaxTensors>(tensors, slice_items, [&](const Table& table) {
    launch(row_sums_kernel, table.start[table.count], kThreads, stream, table);
  });
  check_launch("row_sums_kernel");
  return out;
}

// The phase ops' bucket: as the one-call ops', with the complete row sums of r (and, for
// phase 4, the complete feature sums) of every tensor.
template <class P>
void set_phase_inputs(Bucket<P>& bucket, const std::vector<TensorInfo>& infos,
                      at::TensorList row_sums, double* feature_sums) {
  for (size_t i = 0; i < infos.size(); ++i) {
    TensorArgs& t = bucket.tensors[i];
    if (infos[i].factored) t.row_sums = row_sums[infos[i].state_index].data_ptr<double>();
    t.feature_sums = feature_sums + i * P::kFeatures;
  }
}

template <class P>
void launch_scratch(const std::vector<TensorArgs>& tensors, cudaStream_t stream) {
  const auto items = [&](const TensorArgs& t) {
    return t.factored && t.numel > 0 ? t.geo.row_numel() + t.geo.col_numel() : 0;
  };
  for_each_table<Table, kMaxTensors>(tensors, items, [&](const Table& table) {
    launch(scratch_kernel, blocks_for(table.start[table.count]), kThreads, stream, table);
  });
  check_launch("scratch_kernel");
}

template <class P, typename Setup>
at::Tensor feature_sums_cuda(const char* op, const std::vector<TensorInfo>& infos, at::TensorList params,
                             at::TensorList grads, at::TensorList momentum, at::TensorList rms,
                             at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
                             at::TensorList row_sums, const bool* skip, Setup setup) {
  const int64_t T = static_cast<int64_t>(params.size());
  const c10::DeviceGuard guard(params[0].device());
  const cudaStream_t stream = current_stream(params[0].device());
  at::Tensor out = at::zeros({T, P::kFeatures}, params[0].options().dtype(at::kDouble));
  Bucket<P> bucket(infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < params.size(); ++i) setup(i, bucket.tensors[i]);
  set_phase_inputs(bucket, infos, row_sums, out.data_ptr<double>());
  launch_scratch<P>(bucket.tensors, stream);
  const auto chunk_items = [](const TensorArgs& t) { return t.chunks; };
  dispatch_storage(params[0].scalar_type(), op, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    for_each_table<Table, kMaxTensors>(bucket.tensors, chunk_items, [&](const Table& table) {
      launch(accumulate_kernel<P, S>, table.start[table.count], kThreads, stream, table, skip);
    });
    check_launch("accumulate_kernel");
  });
  const auto one = [](const TensorArgs&) { return int64_t{1}; };
  for_each_table<Table, kMaxTensors>(bucket.tensors, one, [&](const Table& table) {
    launch(feature_sums_kernel<P>, table.count, kThreads, stream, table, skip);
  });
  check_launch("feature_sums_kernel");
  return out;
}

template <class P, typename Setup>
void apply_cuda(const char* op, const std::vector<TensorInfo>& infos, at::TensorList params,
                at::TensorList grads, at::TensorList momentum, at::TensorList rms,
                at::TensorList fac_row, at::TensorList fac_col, at::TensorList fac_diag,
                at::TensorList row_sums, const at::Tensor& feature_sums, const at::Tensor& lr,
                double weight_decay, double step_mult, double exp_mult, const bool* skip, Setup setup) {
  const c10::DeviceGuard guard(params[0].device());
  const cudaStream_t stream = current_stream(params[0].device());
  Bucket<P> bucket(infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag);
  for (size_t i = 0; i < params.size(); ++i) setup(i, bucket.tensors[i]);
  set_phase_inputs(bucket, infos, row_sums, feature_sums.data_ptr<double>());
  launch_scratch<P>(bucket.tensors, stream);
  const at::Tensor lr32 = lr.to(at::kFloat);
  const auto one = [](const TensorArgs&) { return int64_t{1}; };
  for_each_table<Table, kMaxTensors>(bucket.tensors, one, [&](const Table& table) {
    launch(fold_kernel<P>, table.count, kThreads, stream, table, static_cast<float>(step_mult), skip);
  });
  check_launch("fold_kernel");
  const auto contrib_items = [&](const TensorArgs& t) { return is_factored(t) ? contrib_blocks(t.geo) : 0; };
  for_each_table<Table, kMaxTensors>(bucket.tensors, contrib_items, [&](const Table& table) {
    launch(contrib_kernel<P>, table.start[table.count], kThreads, stream, table, skip);
  });
  check_launch("contrib_kernel");
  const auto chunk_items = [](const TensorArgs& t) { return t.chunks; };
  dispatch_storage(params[0].scalar_type(), op, [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    for_each_table<Table, kMaxTensors>(bucket.tensors, chunk_items, [&](const Table& table) {
      launch(update_kernel<P, S>, table.start[table.count], kThreads, stream, table,
             lr32.data_ptr<float>(), static_cast<float>(weight_decay), static_cast<float>(exp_mult), skip);
    });
    check_launch("update_kernel");
  });
  bucket.finish();
}

at::Tensor small_fc_lopt_feature_sums_cuda(at::TensorList params, at::TensorList grads,
                                           at::TensorList momentum, at::TensorList rms,
                                           at::TensorList fac_row, at::TensorList fac_col,
                                           at::TensorList fac_diag, at::TensorList row_sums,
                                           const at::Tensor& decays, const c10::optional<at::Tensor>& skip,
                                           c10::IntArrayRef global_geometry, bool nan_to_num) {
  constexpr const char* op = "small_fc_lopt_feature_sums_";
  const auto infos = check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col,
                                              fac_diag, global_geometry);
  const int64_t T = static_cast<int64_t>(params.size());
  if (skip.has_value()) check_skip(op, *skip, T > 0 ? params[0].device() : skip->device());
  if (T == 0) return at::zeros({0, small_fc_lopt::kFeatures}, decays.options().dtype(at::kDouble));
  check_decays(op, decays, T, params[0].device());
  check_row_sums(op, row_sums, infos, params);
  const float* d = decays.data_ptr<float>();
  const int64_t stride = table_row_stride(decays, kDecays);
  return feature_sums_cuda<small_fc_lopt::Policy>(
      op, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums,
      skip.has_value() ? skip->data_ptr<bool>() : nullptr,
      [&](size_t i, TensorArgs& t) {
        t.decays = d + i * stride;
        t.nan_to_num = nan_to_num ? 1 : 0;
      });
}

void small_fc_lopt_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                              at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                              at::TensorList fac_diag, at::TensorList state_steps, const at::Tensor& lr,
                              const at::Tensor& meta_weights, const at::Tensor& decays,
                              const c10::optional<at::Tensor>& skip, at::TensorList row_sums,
                              const at::Tensor& feature_sums, c10::IntArrayRef global_geometry,
                              double weight_decay, double step_mult, double exp_mult, double step_scale,
                              bool nan_to_num) {
  constexpr const char* op = "small_fc_lopt_apply_";
  const auto infos = check_small_fc_lopt_inputs(params, grads, momentum, rms, fac_row, fac_col, fac_diag,
                                                state_steps, lr, meta_weights, decays, global_geometry, op);
  const int64_t T = static_cast<int64_t>(params.size());
  if (skip.has_value()) check_skip(op, *skip, T > 0 ? params[0].device() : skip->device());
  if (T == 0) return;
  check_row_sums(op, row_sums, infos, params);
  check_feature_sums(op, feature_sums, T, small_fc_lopt::kFeatures, params[0].device());
  const float* weights = meta_weights.data_ptr<float>();
  const float* d = decays.data_ptr<float>();
  const int64_t weights_stride = table_row_stride(meta_weights, small_fc_lopt::kPackedWeights);
  const int64_t decays_stride = table_row_stride(decays, kDecays);
  apply_cuda<small_fc_lopt::Policy>(
      op, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums, feature_sums, lr,
      weight_decay, step_mult, exp_mult, skip.has_value() ? skip->data_ptr<bool>() : nullptr,
      [&](size_t i, TensorArgs& t) {
        t.weights = weights + i * weights_stride;
        t.decays = d + i * decays_stride;
        t.step = state_steps[i].data_ptr<float>();
        t.scale = static_cast<float>(step_scale);
        t.nan_to_num = nan_to_num ? 1 : 0;
      });
}

at::Tensor velo_feature_sums_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                                  at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                                  at::TensorList fac_diag, at::TensorList row_sums, const at::Tensor& skip,
                                  c10::IntArrayRef global_geometry) {
  constexpr const char* op = "velo_feature_sums_";
  const auto infos = check_accumulator_inputs(op, params, grads, momentum, rms, fac_row, fac_col,
                                              fac_diag, global_geometry);
  const int64_t T = static_cast<int64_t>(params.size());
  check_skip(op, skip, T > 0 ? params[0].device() : skip.device());
  if (T == 0) return at::zeros({0, velo::kFeatures}, skip.options().dtype(at::kDouble));
  check_row_sums(op, row_sums, infos, params);
  return feature_sums_cuda<velo::Policy>(op, infos, params, grads, momentum, rms, fac_row, fac_col,
                                         fac_diag, row_sums, skip.data_ptr<bool>(),
                                         [](size_t, TensorArgs&) {});
}

void velo_apply_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                     at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                     at::TensorList fac_diag, const at::Tensor& lr, const at::Tensor& mlp_weights,
                     const at::Tensor& lr_mult, const at::Tensor& skip, at::TensorList row_sums,
                     const at::Tensor& feature_sums, c10::IntArrayRef global_geometry,
                     double weight_decay, double step_mult, double exp_mult) {
  constexpr const char* op = "velo_apply_";
  const auto infos = check_velo_step_inputs(params, grads, momentum, rms, fac_row, fac_col, fac_diag, lr,
                                            mlp_weights, lr_mult, skip, global_geometry, op);
  const int64_t T = static_cast<int64_t>(params.size());
  if (T == 0) return;
  check_row_sums(op, row_sums, infos, params);
  check_feature_sums(op, feature_sums, T, velo::kFeatures, params[0].device());
  const float* weights = mlp_weights.data_ptr<float>();
  const float* mult = lr_mult.data_ptr<float>();
  apply_cuda<velo::Policy>(op, infos, params, grads, momentum, rms, fac_row, fac_col, fac_diag, row_sums,
                           feature_sums, lr, weight_decay, step_mult, exp_mult, skip.data_ptr<bool>(),
                           [&](size_t i, TensorArgs& t) {
                             t.weights = weights + i * velo::kPackedWeights;
                             t.lr_mult = mult + i;
                           });
}

at::Tensor velo_lstm_moments_cuda(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                                  at::TensorList rms, const c10::optional<at::Tensor>& momentum_means) {
  check_velo_lstm_moments_inputs(params, grads, momentum, rms, momentum_means);
  const int64_t T = static_cast<int64_t>(params.size());
  if (T == 0) {
    const auto options = momentum_means.has_value() ? momentum_means->options()
                                                    : at::TensorOptions().dtype(at::kDouble);
    return at::zeros({0, 6}, options.dtype(at::kDouble));
  }
  const c10::DeviceGuard guard(params[0].device());
  const cudaStream_t stream = current_stream(params[0].device());
  at::Tensor out = at::zeros({T, 6}, params[0].options().dtype(at::kDouble));
  std::vector<at::Tensor> keep;
  int64_t chunks = 0;
  const std::vector<StatsTensor> tensors = stats_tensors(params, grads, momentum, rms, keep, chunks);
  at::Tensor moments = uninitialized(
      {std::max<int64_t>(chunks, 1) * static_cast<int64_t>(sizeof(velo::ChunkMoments))},
      params[0].options().dtype(at::kByte));
  auto* chunk_out = reinterpret_cast<velo::ChunkMoments*>(moments.data_ptr());
  const auto chunk_items = [](const StatsTensor& t) { return (t.numel + kChunk - 1) / kChunk; };
  dispatch_storage(params[0].scalar_type(), "velo_lstm_moments", [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    for_each_table<StatsTable, kMaxStatsTensors>(tensors, chunk_items, [&](const StatsTable& table) {
      launch(chunk_moments_kernel<S>, table.start[table.count], kThreads, stream, table, chunk_out);
    });
  });
  check_launch("chunk_moments_kernel");
  const double* means = momentum_means.has_value() ? momentum_means->data_ptr<double>() : nullptr;
  for_each_table<StatsTable, kMaxStatsTensors>(tensors, chunk_items, [&](const StatsTable& table) {
    launch(moments_kernel, table.count, kThreads, stream, table, chunk_out, means, out.data_ptr<double>());
  });
  check_launch("moments_kernel");
  return out;
}

at::Tensor velo_lstm_rows_cuda(const at::Tensor& loss_features, const at::Tensor& iteration, double num_steps,
                               const at::Tensor& sums, const at::Tensor& spreads, c10::IntArrayRef numels,
                               c10::IntArrayRef dims) {
  check_velo_lstm_rows_inputs(loss_features, iteration, num_steps, sums, spreads, numels, dims);
  const int64_t T = static_cast<int64_t>(numels.size());
  const c10::DeviceGuard guard(loss_features.device());
  at::Tensor X = uninitialized({T, velo::kLstmInputs}, loss_features.options());
  if (T == 0) return X;
  const cudaStream_t stream = current_stream(loss_features.device());
  std::vector<StatsTensor> tensors;
  for (int64_t i = 0; i < T; ++i) {
    StatsTensor t{};
    t.numel = numels[i];
    t.dims = static_cast<int>(dims[i]);
    t.index = i;
    tensors.push_back(t);
  }
  const at::Tensor iteration32 = iteration.to(at::kFloat);
  const auto one = [](const StatsTensor&) { return int64_t{1}; };
  for_each_table<StatsTable, kMaxStatsTensors>(tensors, one, [&](const StatsTable& table) {
    launch(rows_from_moments_kernel, blocks_for(table.count), kThreads, stream, table,
           sums.data_ptr<double>(), spreads.data_ptr<double>(), loss_features.data_ptr<float>(),
           iteration32.data_ptr<float>(), static_cast<float>(num_steps), X.data_ptr<float>());
  });
  check_launch("rows_from_moments_kernel");
  return X;
}

void celo_adam_step_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                         at::TensorList exp_avg_sq, const at::Tensor& lr, const at::Tensor& lr_mult,
                         const at::Tensor& iteration, const at::Tensor& skip, double weight_decay,
                         double step_mult, double epsilon) {
  check_celo_adam_inputs(params, grads, exp_avg, exp_avg_sq, lr, lr_mult, iteration, skip, step_mult,
                         epsilon);
  if (params.empty()) return;
  const c10::DeviceGuard guard(params[0].device());
  const cudaStream_t stream = current_stream(params[0].device());
  std::vector<at::Tensor> contiguous, keep;
  std::vector<AdamTensor> tensors;
  for (size_t i = 0; i < params.size(); ++i) {
    contiguous.push_back(params[i].contiguous());
    keep.push_back(grads[i].contiguous());
    AdamTensor t{};
    t.p = contiguous.back().data_ptr();
    t.g = keep.back().data_ptr();
    t.m = exp_avg[i].data_ptr<float>();
    t.v = exp_avg_sq[i].data_ptr<float>();
    t.numel = params[i].numel();
    t.index = static_cast<int64_t>(i);
    tensors.push_back(t);
  }
  const at::Tensor lr32 = lr.to(at::kFloat);
  const auto chunk_items = [](const AdamTensor& t) { return (t.numel + kChunk - 1) / kChunk; };
  dispatch_storage(params[0].scalar_type(), "celo_adam_step_", [&](auto* tag) {
    using S = std::remove_pointer_t<decltype(tag)>;
    for_each_table<AdamTable, kMaxAdamTensors>(tensors, chunk_items, [&](const AdamTable& table) {
      launch(celo_adam_kernel<S>, table.start[table.count], kThreads, stream, table, lr32.data_ptr<float>(),
             lr_mult.data_ptr<float>(), iteration.data_ptr<float>(), static_cast<float>(weight_decay),
             static_cast<float>(step_mult), static_cast<float>(epsilon), skip.data_ptr<bool>());
    });
    check_launch("celo_adam_kernel");
  });
  for (size_t i = 0; i < params.size(); ++i)
    if (!params[i].is_same(contiguous[i])) params[i].copy_(contiguous[i]);
}

}  // namespace
}  // namespace cuda

TORCH_LIBRARY_IMPL(LO_OPS_CUDA_LIBRARY, LO_OPS_CUDA_DISPATCH_KEY, m) {
  m.impl("celo_adam_step_", &cuda::celo_adam_step_cuda);
  m.impl("small_fc_lopt_step_", &cuda::small_fc_lopt_step_cuda);
  m.impl("velo_lstm_input", &cuda::velo_lstm_input_cuda);
  m.impl("velo_step_", &cuda::velo_step_cuda);
  m.impl("factored_gsq_sums", &cuda::factored_gsq_sums_cuda);
  m.impl("factored_update_", &cuda::factored_update_cuda);
  m.impl("small_fc_lopt_feature_sums_", &cuda::small_fc_lopt_feature_sums_cuda);
  m.impl("small_fc_lopt_apply_", &cuda::small_fc_lopt_apply_cuda);
  m.impl("velo_feature_sums_", &cuda::velo_feature_sums_cuda);
  m.impl("velo_apply_", &cuda::velo_apply_cuda);
  m.impl("velo_lstm_moments", &cuda::velo_lstm_moments_cuda);
  m.impl("velo_lstm_rows", &cuda::velo_lstm_rows_cuda);
}

}  // namespace lo_ops
