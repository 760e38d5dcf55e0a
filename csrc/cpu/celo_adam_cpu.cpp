// CPU kernel of lo_ops::celo_adam_step_: one parallel pass over fixed-size chunks of every
// tensor of the bucket (threads take chunks as they free up), the per-element maths of
// ../celo_adam_math.h; each tensor's bias corrections and learning rate computed once. Results
// do not depend on the number of threads.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "../celo_adam_math.h"
#include "adafactor_mlp_cpu.h"

namespace lo_ops {
namespace {

// One chunk of one tensor; compiled for each instruction set (the loop vectorises), the widest
// the processor has picked at run time as for the other kernels.
template <typename scalar_t>
LO_HD void adam_chunk(scalar_t* p, const scalar_t* g, float* m, float* v, int64_t e0, int64_t e1,
                      const celo_adam::Constants& c, float lr, float wd) {
  for (int64_t e = e0; e < e1; ++e)
    p[e] = static_cast<scalar_t>(
        celo_adam::update(static_cast<float>(p[e]), static_cast<float>(g[e]), m[e], v[e], c, lr, wd));
}

#define LO_DEFINE_ADAM_ENTRY(NAME, TARGET)                                                      \
  template <typename scalar_t>                                                                 \
  TARGET void adam_chunk_##NAME(scalar_t* p, const scalar_t* g, float* m, float* v, int64_t e0, \
                                int64_t e1, const celo_adam::Constants& c, float lr, float wd) { \
    adam_chunk(p, g, m, v, e0, e1, c, lr, wd);                                                 \
  }

LO_DEFINE_ADAM_ENTRY(base, )
#if LO_HAVE_ISA_CLONES
LO_DEFINE_ADAM_ENTRY(avx2, LO_TARGET_AVX2)
LO_DEFINE_ADAM_ENTRY(avx512, LO_TARGET_AVX512)
#endif

template <typename scalar_t>
void adam_chunk_for(cpu::CpuIsa isa, scalar_t* p, const scalar_t* g, float* m, float* v, int64_t e0,
                    int64_t e1, const celo_adam::Constants& c, float lr, float wd) {
#if LO_HAVE_ISA_CLONES
  if (isa == cpu::CpuIsa::kAvx512) return adam_chunk_avx512(p, g, m, v, e0, e1, c, lr, wd);
  if (isa == cpu::CpuIsa::kAvx2) return adam_chunk_avx2(p, g, m, v, e0, e1, c, lr, wd);
#endif
  adam_chunk_base(p, g, m, v, e0, e1, c, lr, wd);
}

void celo_adam_step_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg,
                        at::TensorList exp_avg_sq, const at::Tensor& lr, const at::Tensor& lr_mult,
                        const at::Tensor& iteration, const at::Tensor& skip, double weight_decay,
                        double step_mult, double epsilon) {
  check_celo_adam_inputs(params, grads, exp_avg, exp_avg_sq, lr, lr_mult, iteration, skip,
                         step_mult, epsilon);
  if (params.empty() || *skip.data_ptr<bool>()) return;
  const float lr_value = lr.item<float>();
  const float t = *iteration.data_ptr<float>();
  const float* mult = lr_mult.data_ptr<float>();
  const size_t n = params.size();
  std::vector<at::Tensor> p(n), g(n);
  std::vector<celo_adam::Constants> c(n);
  struct Chunk {
    size_t tensor;
    int64_t e0, e1;
  };
  std::vector<Chunk> chunks;
  for (size_t i = 0; i < n; ++i) {
    p[i] = params[i].contiguous();
    g[i] = grads[i].contiguous();
    c[i] = celo_adam::constants(t, mult[i], static_cast<float>(step_mult), static_cast<float>(epsilon));
    const int64_t numel = params[i].numel();
    for (int64_t e0 = 0; e0 < numel; e0 += cpu::kChunk)
      chunks.push_back({i, e0, std::min(numel, e0 + cpu::kChunk)});
  }
  const float wd = static_cast<float>(weight_decay);
  const cpu::CpuIsa isa = cpu::select_isa();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[0].scalar_type(),
                                  "celo_adam_step_cpu", [&] {
    cpu::parallel_items(
        static_cast<int64_t>(chunks.size()), [&](int64_t k) { return chunks[k].e1 - chunks[k].e0; },
        [&](int64_t k) {
          const Chunk& ch = chunks[k];
          adam_chunk_for<scalar_t>(isa, p[ch.tensor].data_ptr<scalar_t>(),
                                   g[ch.tensor].data_ptr<scalar_t>(),
                                   exp_avg[ch.tensor].data_ptr<float>(),
                                   exp_avg_sq[ch.tensor].data_ptr<float>(), ch.e0, ch.e1,
                                   c[ch.tensor], lr_value, wd);
        });
  });
  for (size_t i = 0; i < n; ++i)
    if (!params[i].is_same(p[i])) params[i].copy_(p[i]);
}

}  // namespace

TORCH_LIBRARY_IMPL(lo_ops, CPU, m) { m.impl("celo_adam_step_", &celo_adam_step_cpu); }

}  // namespace lo_ops
