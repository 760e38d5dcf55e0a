// CPU kernels of VeLO's ops:
// - lo_ops::velo_lstm_input: one parallel pass over fixed-size chunks of every tensor of the
//   bucket gathers the sums behind each tensor's LSTM input (spec 3.2). Within a chunk (in
//   cache) the momentum and rms spreads are taken about the chunk's own means; chunks are then
//   combined in order (sum of squares about the tensor mean = chunk sums of squares plus
//   count * (chunk mean - tensor mean)^2), which stays exact where E[x^2] - E[x]^2 would cancel.
//   The same pass checks that every gradient is finite.
// - lo_ops::velo_step_: the shared kernel of adafactor_mlp_cpu.h with VeLO's features (30
//   channels, clipped gradients), each tensor's own blended 30-4-4-3 MLP and the per-tensor
//   step scale lr_mult * param_scale * step_mult.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../velo_math.h"
#include "adafactor_mlp_cpu.h"

namespace lo_ops {
namespace {

using VeLOPolicy = velo::Policy;

void velo_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList momentum,
                   at::TensorList rms, at::TensorList fac_row, at::TensorList fac_col,
                   at::TensorList fac_diag, const at::Tensor& lr, const at::Tensor& mlp_weights,
                   const at::Tensor& lr_mult, const at::Tensor& skip, double weight_decay,
                   double step_mult, double exp_mult) {
  const auto infos = check_velo_step_inputs(params, grads, momentum, rms, fac_row, fac_col,
                                            fac_diag, lr, mlp_weights, lr_mult, skip);
  if (params.empty() || *skip.data_ptr<bool>()) return;
  const float* weights = mlp_weights.data_ptr<float>();
  const float* mult = lr_mult.data_ptr<float>();
  cpu::run_bucket<VeLOPolicy>(infos, params, grads, momentum, rms, fac_row,
                              fac_col, fac_diag, lr, weight_decay, step_mult, exp_mult,
                              /*check_finite=*/false,  // skip says it (velo_lstm_input)
                              [&](size_t i, cpu::TensorWork<VeLOPolicy>& w) {
                                w.weights = weights + i * velo::kPackedWeights;
                                w.lr_mult = mult[i];
                              });
}

// -- velo_lstm_input ------------------------------------------------------------------------------

// Float vector partial sums over at most kFloatTiles tiles, folded into per-lane doubles.
template <typename V>
struct LaneSums {
  V part{};
  double acc[kMaxLanes] = {};
  LO_HD void add(V x) { part += x; }
  LO_HD void flush() {
    for (int l = 0; l < kLanesOf<V>; ++l) acc[l] += part[l];
    part = V{};
  }
  LO_HD double total() const {
    double s = 0;
    for (int l = 0; l < kLanesOf<V>; ++l) s += acc[l];
    return s;
  }
};

template <typename Isa, typename scalar_t>
LO_HD void chunk_moments(const scalar_t* p, const scalar_t* g, const float* m, int64_t n,
                         const float* v, int64_t e0, int64_t e1, velo::ChunkMoments& out) {
  using V = typename Isa::V;
  constexpr int L = kLanesOf<V>;
  LaneSums<V> p_sq, v_sum, m_sum[kMomentumChannels];
  V nonfinite{};  // g * 0 is NaN exactly when g is not finite
  int tiles = 0;
  for (int64_t e = e0; e < e1; e += L) {
    const int count = static_cast<int>(std::min<int64_t>(L, e1 - e));
    const V pv = load_lanes<V>(p + e, count);
    const V gv = load_lanes<V>(g + e, count);
    nonfinite += gv * 0.0f;
    p_sq.add(pv * pv);
    v_sum.add(load_lanes<V>(v + e, count));
    for (int k = 0; k < kMomentumChannels; ++k) m_sum[k].add(load_lanes<V>(m + k * n + e, count));
    if (++tiles == cpu::kFloatTiles || e + L >= e1) {
      p_sq.flush();
      v_sum.flush();
      for (auto& s : m_sum) s.flush();
      tiles = 0;
    }
  }
  for (int l = 0; l < L; ++l) out.finite = out.finite && nonfinite[l] == 0.0f;
  const double count = static_cast<double>(e1 - e0);
  out.p_sq = p_sq.total();
  out.v = v_sum.total();
  float m_mean[kMomentumChannels];
  for (int k = 0; k < kMomentumChannels; ++k) {
    out.m[k] = m_sum[k].total();
    m_mean[k] = static_cast<float>(out.m[k] / count);
  }
  const float v_mean = static_cast<float>(out.v / count);
  // Second sweep over the chunk (now in cache): squares about the chunk means. Padding lanes
  // are masked to zero.
  LaneSums<V> v_sq, m_sq[kMomentumChannels];
  tiles = 0;
  for (int64_t e = e0; e < e1; e += L) {
    const int count_lanes = static_cast<int>(std::min<int64_t>(L, e1 - e));
    V mask{};
    for (int l = 0; l < count_lanes; ++l) mask[l] = 1.0f;
    const V dv = (load_lanes<V>(v + e, count_lanes) - v_mean) * mask;
    v_sq.add(dv * dv);
    for (int k = 0; k < kMomentumChannels; ++k) {
      const V dm = (load_lanes<V>(m + k * n + e, count_lanes) - m_mean[k]) * mask;
      m_sq[k].add(dm * dm);
    }
    if (++tiles == cpu::kFloatTiles || e + L >= e1) {
      v_sq.flush();
      for (auto& s : m_sq) s.flush();
      tiles = 0;
    }
  }
  // Re-centre on the float means used above: sum (x - a)^2 about the exact mean mu is
  // sum (x - a)^2 - count (mu - a)^2.
  const double dv = out.v / count - v_mean;
  out.v_sq_about_mean = v_sq.total() - count * dv * dv;
  for (int k = 0; k < kMomentumChannels; ++k) {
    const double dm = out.m[k] / count - m_mean[k];
    out.m_sq_about_mean[k] = m_sq[k].total() - count * dm * dm;
  }
}

#define LO_DEFINE_MOMENT_ENTRY(NAME, ISA, TARGET)                                              \
  template <typename scalar_t>                                                                 \
  TARGET void chunk_moments_##NAME(const scalar_t* p, const scalar_t* g, const float* m,       \
                                   int64_t n, const float* v, int64_t e0, int64_t e1,          \
                                   velo::ChunkMoments& out) {                                        \
    chunk_moments<ISA, scalar_t>(p, g, m, n, v, e0, e1, out);                                  \
  }

LO_DEFINE_MOMENT_ENTRY(base, IsaBase, )
#if LO_HAVE_ISA_CLONES
LO_DEFINE_MOMENT_ENTRY(avx2, IsaAvx2, LO_TARGET_AVX2)
LO_DEFINE_MOMENT_ENTRY(avx512, IsaAvx512, LO_TARGET_AVX512)
#endif

template <typename scalar_t>
void chunk_moments_for(cpu::CpuIsa isa, const scalar_t* p, const scalar_t* g, const float* m,
                       int64_t n, const float* v, int64_t e0, int64_t e1, velo::ChunkMoments& out) {
#if LO_HAVE_ISA_CLONES
  if (isa == cpu::CpuIsa::kAvx512) return chunk_moments_avx512(p, g, m, n, v, e0, e1, out);
  if (isa == cpu::CpuIsa::kAvx2) return chunk_moments_avx2(p, g, m, n, v, e0, e1, out);
#endif
  chunk_moments_base(p, g, m, n, v, e0, e1, out);
}

// The moments of every chunk of kChunk elements of every tensor (tensor by tensor, in one
// parallel pass); first[i] is tensor i's first chunk, first[T] the number of chunks.
std::vector<velo::ChunkMoments> bucket_moments(at::TensorList params, at::TensorList grads,
                                               at::TensorList momentum, at::TensorList rms,
                                               std::vector<int64_t>& first) {
  struct Chunk {
    int64_t tensor, e0, e1;
  };
  const int64_t T = static_cast<int64_t>(params.size());
  std::vector<at::Tensor> p(T), g(T);
  first.assign(T + 1, 0);
  std::vector<Chunk> chunks;
  for (int64_t i = 0; i < T; ++i) {
    p[i] = params[i].contiguous();
    g[i] = grads[i].contiguous();
    first[i] = static_cast<int64_t>(chunks.size());
    const int64_t n = params[i].numel();
    for (int64_t e0 = 0; e0 < n; e0 += cpu::kChunk)
      chunks.push_back({i, e0, std::min(n, e0 + cpu::kChunk)});
  }
  first[T] = static_cast<int64_t>(chunks.size());
  std::vector<velo::ChunkMoments> moments(chunks.size());
  if (T == 0) return moments;
  const cpu::CpuIsa isa = cpu::select_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "velo_chunk_moments_cpu", [&] {
    cpu::parallel_items(
        static_cast<int64_t>(chunks.size()),
        [&](int64_t c) { return chunks[c].e1 - chunks[c].e0; },
        [&](int64_t c) {
          const Chunk& ch = chunks[c];
          chunk_moments_for<scalar_t>(isa, p[ch.tensor].data_ptr<scalar_t>(),
                                      g[ch.tensor].data_ptr<scalar_t>(),
                                      momentum[ch.tensor].data_ptr<float>(),
                                      params[ch.tensor].numel(), rms[ch.tensor].data_ptr<float>(),
                                      ch.e0, ch.e1, moments[c]);
        });
  });
  return moments;
}

// The LSTM inputs every tensor shares: the time features, then the loss features.
constexpr int kSharedInputs = velo::kFirstLossFeature + velo::kLossFeatures;
void shared_inputs(const at::Tensor& loss_features, const at::Tensor& iteration, double num_steps,
                   float* out) {
  const float t = *iteration.data_ptr<float>();
  const float* loss = loss_features.data_ptr<float>();
  for (int k = 0; k < velo::kTimeFeatures; ++k)
    out[k] = velo::time_feature(t, static_cast<float>(num_steps), k);
  for (int k = 0; k < velo::kLossFeatures; ++k) out[velo::kFirstLossFeature + k] = loss[k];
}

std::tuple<at::Tensor, at::Tensor> velo_lstm_input_cpu(at::TensorList params,
                                                       at::TensorList grads,
                                                       at::TensorList momentum,
                                                       at::TensorList rms,
                                                       const at::Tensor& loss_features,
                                                       const at::Tensor& iteration,
                                                       double num_steps) {
  check_velo_lstm_input_inputs(params, grads, momentum, rms, loss_features, iteration, num_steps);
  const int64_t T = static_cast<int64_t>(params.size());
  at::Tensor X = at::empty({T, velo::kLstmInputs}, loss_features.options());
  at::Tensor finite = at::empty({}, loss_features.options().dtype(at::kBool));
  float shared_row[kSharedInputs];
  shared_inputs(loss_features, iteration, num_steps, shared_row);

  std::vector<int64_t> first;
  const std::vector<velo::ChunkMoments> moments = bucket_moments(params, grads, momentum, rms, first);
  bool all_finite = true;
  for (const auto& mo : moments) all_finite = all_finite && mo.finite;
  *finite.data_ptr<bool>() = all_finite;
  float* out = X.data_ptr<float>();
  for (int64_t i = 0; i < T; ++i) {
    float* row = out + i * velo::kLstmInputs;
    std::copy(shared_row, shared_row + kSharedInputs, row);
    int dims = 0;
    for (const int64_t s : params[i].sizes()) dims += s > 1 ? 1 : 0;
    const int64_t n = params[i].numel();
    const velo::TensorMoments mo =
        n > 0 ? velo::combine_chunks(moments.data() + first[i], first[i + 1] - first[i], n, cpu::kChunk)
              : velo::TensorMoments{};
    velo::lstm_tensor_features(mo, n, dims, row);
  }
  return {X, finite};
}

// The moments of shards: plain sums, or sums of squares about the whole tensors' momentum
// means (see lo_ops.cpp), from the same chunk moments as velo_lstm_input.
at::Tensor velo_lstm_moments_cpu(at::TensorList params, at::TensorList grads,
                                 at::TensorList momentum, at::TensorList rms,
                                 const c10::optional<at::Tensor>& momentum_means) {
  check_velo_lstm_moments_inputs(params, grads, momentum, rms, momentum_means);
  const int64_t T = static_cast<int64_t>(params.size());
  constexpr int kWidth = 6;
  if (T == 0) {
    const auto options = momentum_means.has_value() ? momentum_means->options()
                                                    : at::TensorOptions().dtype(at::kDouble);
    return at::zeros({0, kWidth}, options.dtype(at::kDouble));
  }
  at::Tensor out = at::zeros({T, kWidth}, params[0].options().dtype(at::kDouble));
  std::vector<int64_t> first;
  const std::vector<velo::ChunkMoments> moments = bucket_moments(params, grads, momentum, rms, first);
  double* dst = out.data_ptr<double>();
  for (int64_t i = 0; i < T; ++i) {
    velo::TensorMoments mo;
    double* row = dst + i * kWidth;
    const int64_t n = params[i].numel();
    if (!momentum_means.has_value()) {
      double nonfinite = 0;
      for (int64_t c = first[i]; c < first[i + 1]; ++c) {
        velo::add_chunk_sums(moments[c], mo);
        nonfinite += moments[c].finite ? 0.0 : 1.0;
      }
      row[0] = mo.p_sq;
      for (int k = 0; k < kMomentumChannels; ++k) row[1 + k] = mo.m[k];
      row[4] = mo.v;
      row[5] = nonfinite;
    } else {
      const double* means = momentum_means->data_ptr<double>() + i * kMomentumChannels;
      const double mu[kMomentumChannels] = {means[0], means[1], means[2]};
      for (int64_t c = first[i]; c < first[i + 1]; ++c)
        velo::add_chunk_spreads(moments[c], velo::chunk_count(n, c - first[i], cpu::kChunk), mu, mo);
      for (int k = 0; k < kMomentumChannels; ++k) {
        row[k] = mo.m_centred_sq[k];
        row[kMomentumChannels + k] = mo.v_spread_sq[k];
      }
    }
  }
  return out;
}

at::Tensor velo_lstm_rows_cpu(const at::Tensor& loss_features, const at::Tensor& iteration,
                              double num_steps, const at::Tensor& sums, const at::Tensor& spreads,
                              c10::IntArrayRef numels, c10::IntArrayRef dims) {
  const int64_t T = static_cast<int64_t>(numels.size());
  check_velo_lstm_rows_inputs(loss_features, iteration, num_steps, sums, spreads, numels, dims);
  at::Tensor X = at::empty({T, velo::kLstmInputs}, loss_features.options());
  float shared_row[kSharedInputs];
  shared_inputs(loss_features, iteration, num_steps, shared_row);
  const double* s = sums.data_ptr<double>();
  const double* d = spreads.data_ptr<double>();
  float* out = X.data_ptr<float>();
  for (int64_t i = 0; i < T; ++i) {
    float* row = out + i * velo::kLstmInputs;
    std::copy(shared_row, shared_row + kSharedInputs, row);
    velo::TensorMoments mo;
    const double* si = s + i * 6;
    const double* di = d + i * 6;
    mo.p_sq = si[0];
    mo.v = si[4];
    for (int k = 0; k < kMomentumChannels; ++k) {
      mo.m[k] = si[1 + k];
      mo.m_centred_sq[k] = di[k];
      mo.v_spread_sq[k] = di[kMomentumChannels + k];
    }
    velo::lstm_tensor_features(mo, numels[i], static_cast<int>(dims[i]), row);
  }
  return X;
}

}  // namespace

TORCH_LIBRARY_IMPL(lo_ops, CPU, m) {
  m.impl("velo_lstm_rows", &velo_lstm_rows_cpu);
  m.impl("velo_lstm_moments", &velo_lstm_moments_cpu);
  m.impl("velo_lstm_input", &velo_lstm_input_cpu);
  m.impl("velo_step_", &velo_step_cpu);
}

}  // namespace lo_ops
