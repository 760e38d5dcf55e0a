// What ops.cu needs of the device besides the kernels: launches, the current stream, memory the
// kernels write before reading, and the library and dispatch key the kernels register under.
// nvcc builds launch with <<<...>>> on the current CUDA stream; the CUDA emulator of
// lo_ops.testing compiles ops.cu as host C++ with LO_OPS_CUDA_EMULATOR defined and runs the same
// kernels on the CPU (registered in its own library for CPU tensors).
#pragma once

#include <ATen/ATen.h>
#include <c10/core/impl/VirtualGuardImpl.h>

#include <cuda_runtime.h>

#include <cstdint>
#include <cstring>
#include <utility>

#ifndef LO_OPS_CUDA_LIBRARY
#define LO_OPS_CUDA_LIBRARY lo_ops
#endif
#ifndef LO_OPS_CUDA_DISPATCH_KEY
#define LO_OPS_CUDA_DISPATCH_KEY CUDA
#endif

namespace lo_ops {
namespace cuda {

inline cudaStream_t current_stream(const at::Device& device) {
#ifdef LO_OPS_CUDA_EMULATOR
  (void)device;
  return nullptr;
#else
  const c10::impl::VirtualGuardImpl impl(c10::DeviceType::CUDA);
  return static_cast<cudaStream_t>(impl.getStream(device).native_handle());
#endif
}

// kernel<<<blocks, threads, 0, stream>>>(args...), one-dimensional.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), int64_t blocks, int threads, cudaStream_t stream,
            Args&&... args) {
  TORCH_CHECK(blocks > 0 && blocks <= INT32_MAX, "lo_ops: a launch of ", blocks,
              " blocks is outside CUDA's grid limits");
#ifdef LO_OPS_CUDA_EMULATOR
  emulator::launch(kernel, dim3(static_cast<unsigned>(blocks)), dim3(threads), 0, stream,
                   std::forward<Args>(args)...);
#else
  kernel<<<static_cast<unsigned>(blocks), threads, 0, stream>>>(std::forward<Args>(args)...);
#endif
}

// Device memory that the kernels write before they read it. Under the emulator it is filled
// with 0xFF bytes (NaN in float and double), so that a read of anything unwritten shows.
inline at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor t = at::empty(sizes, options);
#ifdef LO_OPS_CUDA_EMULATOR
  if (t.numel() > 0) std::memset(t.data_ptr(), 0xff, t.nbytes());
#endif
  return t;
}

}  // namespace cuda
}  // namespace lo_ops
