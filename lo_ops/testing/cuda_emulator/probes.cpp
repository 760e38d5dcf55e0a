// Probe kernels of the CUDA emulator: small device programs, right and wrong, with which the
// tests check that the emulator runs CUDA semantics and reports misuse. Each writes one float per
// thread (or raises the error the emulator finds).
#include <ATen/ATen.h>

#include <cuda_runtime.h>

#include <map>
#include <string>

namespace lo_ops {
namespace cuda {
namespace probes {

__device__ __forceinline__ int64_t linear_block() {
  return (static_cast<int64_t>(blockIdx.z) * gridDim.y + blockIdx.y) * gridDim.x + blockIdx.x;
}

__device__ __forceinline__ int64_t flat_index() {
  const int64_t t = (static_cast<int64_t>(threadIdx.z) * blockDim.y + threadIdx.y) * blockDim.x + threadIdx.x;
  return linear_block() * (blockDim.x * blockDim.y * blockDim.z) + t;
}

// Shared memory read before anything wrote it.
__global__ void uninitialised_shared(float* out) {
  __shared__ float s[64];
  out[flat_index()] = s[threadIdx.x % 64];
}

// Each thread publishes its index; thread t reads thread (t + 33) % n: right only with the
// barrier between write and read.
template <bool kBarrier>
__global__ void neighbour_exchange(float* out) {
  __shared__ float s[1024];
  s[threadIdx.x] = static_cast<float>(threadIdx.x);
  if (kBarrier) __syncthreads();
  out[flat_index()] = s[(threadIdx.x + 33) % blockDim.x];
}

// Block sums, one value per thread, reusing one scratch array twice: with `kReuseBarrier` false
// the barrier that protects the scratch before its reuse is missing.
template <bool kReuseBarrier>
__global__ void two_block_sums(float* out) {
  __shared__ float scratch[32];
  float total = 0.f;
  for (int round = 0; round < 2; ++round) {
    float x = static_cast<float>(threadIdx.x + round);
    for (int offset = 16; offset > 0; offset /= 2) x += __shfl_down_sync(0xffffffffu, x, offset);
    if (kReuseBarrier) __syncthreads();
    if (threadIdx.x % 32 == 0) scratch[threadIdx.x / 32] = x;
    __syncthreads();
    if (threadIdx.x == 0)
      for (unsigned w = 0; w < blockDim.x / 32; ++w) total += scratch[w];
  }
  out[flat_index()] = threadIdx.x == 0 ? total : 0.f;
}

__global__ void indices(float* out) {
  const int64_t i = flat_index();
  out[i] = static_cast<float>(((threadIdx.x + 8 * threadIdx.y + 64 * threadIdx.z) * 1000) +
                              (blockIdx.x + 4 * blockIdx.y) + 100 * (blockDim.x + gridDim.x));
}

// Every shuffle flavour; out = sum of the results, weighted so that each is told apart.
__global__ void shuffles(float* out) {
  const float v = static_cast<float>(threadIdx.x % 32);
  const float down = __shfl_down_sync(0xffffffffu, v, 3);
  const float up = __shfl_up_sync(0xffffffffu, v, 5, 16);
  const float x = __shfl_xor_sync(0xffffffffu, v, 6);
  const float idx = __shfl_sync(0xffffffffu, v, 7, 8);
  const double d = __shfl_down_sync(0xffffffffu, static_cast<double>(v) + 0.5, 1);
  out[flat_index()] = down + 100.f * up + 1e4f * x + 1e6f * idx + static_cast<float>(1e-3 * d);
}

__global__ void predicates(float* out) {
  const int a = __syncthreads_and(threadIdx.x != 7);
  const int o = __syncthreads_or(threadIdx.x == 7);
  const int c = __syncthreads_count(threadIdx.x % 3 == 0);
  out[flat_index()] = static_cast<float>(a + 10 * o + 100 * c);
}

__global__ void exit_before_barrier(float* out) {
  if (threadIdx.x == 5) return;
  __syncthreads();
  out[flat_index()] = 1.f;
}

__global__ void exit_while_others_wait(float* out) {
  if (threadIdx.x >= 32) return;  // warp 0 waits at the barrier for warps that have left
  __syncthreads();
  out[flat_index()] = 1.f;
}

__global__ void mixed_barriers(float* out) {
  if (threadIdx.x < 32)
    __syncthreads();
  else
    (void)__syncthreads_and(1);
  out[flat_index()] = 1.f;
}

__global__ void divergent_barriers(float* out) {
  if (threadIdx.x % 2)
    __syncthreads();
  else
    __syncthreads();
  out[flat_index()] = 1.f;
}

__global__ void shuffle_after_lane_exit(float* out) {
  if (threadIdx.x % 32 == 3) return;
  out[flat_index()] = __shfl_down_sync(0xffffffffu, 1.f, 1);
}

__global__ void shuffle_mask_without_self(float* out) {
  out[flat_index()] = __shfl_down_sync(0xfffffffeu, 1.f, 1);
}

__global__ void shuffle_reads_outside_mask(float* out) {
  if (threadIdx.x % 32 < 16) out[flat_index()] = __shfl_down_sync(0x0000ffffu, 1.f, 8);
}

__global__ void shuffle_and_barrier_deadlock(float* out) {
  if (threadIdx.x % 32 == 0)
    __syncthreads();
  else
    out[flat_index()] = __shfl_down_sync(0xffffffffu, 1.f, 1);
  __syncthreads();
}

}  // namespace probes
}  // namespace cuda

namespace emulator {

at::Tensor run_probe(const std::string& name, int64_t blocks, int64_t threads) {
  namespace p = cuda::probes;
  using Kernel = void (*)(float*);
  static const std::map<std::string, Kernel> kernels = {
      {"uninitialised_shared", p::uninitialised_shared},
      {"neighbour_exchange", p::neighbour_exchange<true>},
      {"neighbour_exchange_without_barrier", p::neighbour_exchange<false>},
      {"two_block_sums", p::two_block_sums<true>},
      {"two_block_sums_without_reuse_barrier", p::two_block_sums<false>},
      {"shuffles", p::shuffles},
      {"predicates", p::predicates},
      {"exit_before_barrier", p::exit_before_barrier},
      {"exit_while_others_wait", p::exit_while_others_wait},
      {"mixed_barriers", p::mixed_barriers},
      {"divergent_barriers", p::divergent_barriers},
      {"shuffle_after_lane_exit", p::shuffle_after_lane_exit},
      {"shuffle_mask_without_self", p::shuffle_mask_without_self},
      {"shuffle_reads_outside_mask", p::shuffle_reads_outside_mask},
      {"shuffle_and_barrier_deadlock", p::shuffle_and_barrier_deadlock},
  };
  const bool three_d = name == "indices";
  const auto it = kernels.find(name);
  TORCH_CHECK(three_d || it != kernels.end(), "lo_ops CUDA emulator: no probe named '", name, "'");
  TORCH_CHECK(blocks > 0 && threads > 0, "lo_ops CUDA emulator: probe needs blocks > 0 and threads > 0");
  // `indices` runs on a 2-D grid of [blocks, 2] blocks of [threads, 2, 2] threads.
  const dim3 grid = three_d ? dim3(static_cast<unsigned>(blocks), 2) : dim3(static_cast<unsigned>(blocks));
  const dim3 block = three_d ? dim3(static_cast<unsigned>(threads), 2, 2) : dim3(static_cast<unsigned>(threads));
  at::Tensor out = at::zeros({static_cast<int64_t>(grid.x) * grid.y * block.x * block.y * block.z},
                             at::TensorOptions().dtype(at::kFloat));
  launch(three_d ? p::indices : it->second, grid, block, 0, nullptr, out.data_ptr<float>());
  return out;
}

}  // namespace emulator
}  // namespace lo_ops
