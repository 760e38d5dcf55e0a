// CUDA kernel of lo_ops::celo_adam_step_ (plain CUDA on raw pointers): one block per chunk of
// kChunk elements of every tensor of the bucket, the per-element maths of ../celo_adam_math.h.
// Each block computes its tensor's bias corrections once (thread 0, into shared memory); the
// step count, lr, lr_mult and skip flag are read from device memory, so a captured graph replays.
#pragma once

#include "../celo_adam_math.h"
#include "adafactor_mlp.cuh"

namespace lo_ops {
namespace cuda {

struct AdamTensor {
  void* p;
  const void* g;
  float* m;
  float* v;
  int64_t numel;
  int64_t index;  // into lr_mult
};

constexpr int kMaxAdamTensors = table_capacity(sizeof(AdamTensor));

struct AdamTable {
  AdamTensor t[kMaxAdamTensors];
  int64_t start[kMaxAdamTensors + 1];
  int count;
};
static_assert(sizeof(AdamTable) <= kKernelParamBytes - kOtherParamBytes,
              "the tensor table must fit the kernel parameter space");

template <typename S>
__global__ void __launch_bounds__(kThreads) celo_adam_kernel(AdamTable table, const float* lr,
                                                             const float* lr_mult,
                                                             const float* iteration,
                                                             float weight_decay, float step_mult,
                                                             float epsilon, const bool* skip) {
  if (skipped(skip)) return;
  __shared__ celo_adam::Constants constants;
  const int ti = find_tensor(table, blockIdx.x);
  const AdamTensor& t = table.t[ti];
  if (threadIdx.x == 0) constants = celo_adam::constants(*iteration, lr_mult[t.index], step_mult, epsilon);
  __syncthreads();
  const celo_adam::Constants c = constants;
  const float lr_value = *lr;
  const int64_t e0 = (blockIdx.x - table.start[ti]) * kChunk;
  for (int k = 0; k < kElementsPerThread; ++k) {
    const int64_t e = e0 + k * kThreads + threadIdx.x;
    if (e >= t.numel) break;
    const float p = to_float(static_cast<const S*>(t.p)[e]);
    const float g = to_float(static_cast<const S*>(t.g)[e]);
    static_cast<S*>(t.p)[e] =
        from_float<S>(celo_adam::update(p, g, t.m[e], t.v[e], c, lr_value, weight_decay));
  }
}

}  // namespace cuda
}  // namespace lo_ops
