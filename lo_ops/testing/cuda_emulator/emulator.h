// The CUDA emulator: runs the device code of lo_ops' kernels (csrc/cuda/*.cuh, compiled
// unchanged as host C++) on the CPU. Every CUDA thread of a block is a cooperative context
// (a fiber with its own stack); __syncthreads and friends are real block barriers and the
// __shfl_*_sync exchanges real warp rendezvous that check their masks. Blocks run one after
// another on the calling thread, so static storage is a block's __shared__ memory; it is filled
// with 0xFF bytes (NaN for floats) before every block.
//
// Errors (reported as a C++ exception from the launch, naming kernel, block, thread and source
// line): a barrier that some threads of the block never reach (they exited), barriers of
// different kinds or at different call sites met by one barrier round, a warp exchange whose
// mask omits the caller, names lanes that do not exist or have exited, or that the named
// lanes meet with another mask or call, a read from a lane outside the mask, deadlock, launch
// configurations CUDA rejects and parameter lists larger than the kernel parameter space.
//
// Schedules: "lockstep" runs the ready threads of a block round-robin in thread order and the
// blocks in order; "adversarial" runs blocks in a random order and, within a block, one warp at
// a time (a random warp among those with ready lanes) with its ready lanes in random order,
// each until it blocks, so that an access order a missing barrier allows shows up.
#pragma once

#include <math.h>

#include <cstddef>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <utility>

// CUDA's vector types and runtime API surface used by the project's code.
struct uint3 {
  unsigned int x, y, z;
};
struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1)
      : x(x_), y(y_), z(z_) {}
};
typedef struct CUstream_st* cudaStream_t;
enum cudaError_t { cudaSuccess = 0 };
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline const char* cudaGetErrorString(cudaError_t) { return "no error"; }

// The runtime version the emulated code is compiled against (12.1 and newer allow 32764 bytes
// of kernel parameters); a build may choose another.
#ifndef CUDART_VERSION
#define CUDART_VERSION 12080
#endif

// Device functions and kernels are inline functions, so that their static variables (the
// __shared__ ones) get vague linkage: sections named after the function, which
// shared_memory.ld gathers.
#define __global__ inline
#define __device__ inline
#define __host__
#define __forceinline__ __attribute__((always_inline))
#define __launch_bounds__(...)
#define __shared__ static
#define __restrict__ __restrict
constexpr int warpSize = 32;

namespace lo_ops {
namespace emulator {

// Bytes of kernel parameters CUDA accepts for this runtime version.
constexpr std::size_t kParamBytes = CUDART_VERSION >= 12010 ? 32764 : 4096;

enum class Barrier : int { kSync = 0, kAnd = 1, kOr = 2, kCount = 3 };
enum class Exchange : int { kIdx = 0, kUp = 1, kDown = 2, kXor = 3, kSyncWarp = 4 };

const uint3& thread_idx();
const uint3& block_idx();
const dim3& block_dim();
const dim3& grid_dim();

// A block barrier of `kind` reached by the calling thread; returns the barrier's predicate
// result (AND, OR or count of `value` over the block; 0 for a plain barrier).
int block_barrier(Barrier kind, int value, const char* file, int line);

// A warp exchange: the calling lane publishes `bits` and receives the bits of the lane its
// arguments name once every lane in `mask` has arrived at the same call.
uint64_t warp_exchange(Exchange kind, unsigned mask, uint64_t bits, int lane_arg, int width,
                       const char* file, int line);

template <typename T>
T shuffle(const char* file, int line, Exchange kind, unsigned mask, T var, int lane_arg,
          int width = warpSize) {
  static_assert(sizeof(T) <= sizeof(uint64_t) && std::is_trivially_copyable<T>::value,
                "warp shuffles move values of at most 8 bytes");
  uint64_t bits = 0;
  std::memcpy(&bits, &var, sizeof(T));
  bits = warp_exchange(kind, mask, bits, lane_arg, width, file, line);
  T out;
  std::memcpy(&out, &bits, sizeof(T));
  return out;
}

// Runs body(ctx) as every thread of a grid<<<grid, block>>> of `kernel` (its address names it in
// error messages); throws std::runtime_error on an error of the launch or of the device code.
using Body = void (*)(void* ctx);
void run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_shared,
              std::size_t param_bytes, Body body, void* ctx);

// Bytes of a kernel's parameter list as CUDA lays it out (each parameter at its alignment).
template <typename... Params>
constexpr std::size_t param_bytes() {
  std::size_t offset = 0;
  ((offset = (offset + alignof(Params) - 1) / alignof(Params) * alignof(Params) + sizeof(Params)),
   ...);
  return offset;
}

// kernel<<<grid, block, dynamic_shared, stream>>>(args...): the arguments are converted to
// the kernel's parameter types once, as a launch does, and each thread receives its own copy.
template <typename... Params, typename... Args>
void launch(void (*kernel)(Params...), dim3 grid, dim3 block, std::size_t dynamic_shared,
            cudaStream_t, Args&&... args) {
  using Tuple = std::tuple<std::decay_t<Params>...>;
  struct Launch {
    void (*kernel)(Params...);
    Tuple params;
  } launch{kernel, Tuple(std::forward<Args>(args)...)};
  run_grid(reinterpret_cast<const void*>(kernel), grid, block, dynamic_shared, param_bytes<std::decay_t<Params>...>(),
           [](void* ctx) {
             auto* l = static_cast<Launch*>(ctx);
             std::apply(l->kernel, l->params);
           },
           &launch);
}

}  // namespace emulator
}  // namespace lo_ops

#define threadIdx (::lo_ops::emulator::thread_idx())
#define blockIdx (::lo_ops::emulator::block_idx())
#define blockDim (::lo_ops::emulator::block_dim())
#define gridDim (::lo_ops::emulator::grid_dim())

#define __syncthreads() \
  ((void)::lo_ops::emulator::block_barrier(::lo_ops::emulator::Barrier::kSync, 0, __FILE__, __LINE__))
#define __syncthreads_and(p) \
  ::lo_ops::emulator::block_barrier(::lo_ops::emulator::Barrier::kAnd, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_or(p) \
  ::lo_ops::emulator::block_barrier(::lo_ops::emulator::Barrier::kOr, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncthreads_count(p) \
  ::lo_ops::emulator::block_barrier(::lo_ops::emulator::Barrier::kCount, (p) ? 1 : 0, __FILE__, __LINE__)
#define __syncwarp(mask)                                                                       \
  ((void)::lo_ops::emulator::warp_exchange(::lo_ops::emulator::Exchange::kSyncWarp, (mask), 0, \
                                           0, warpSize, __FILE__, __LINE__))
#define __shfl_sync(...) \
  ::lo_ops::emulator::shuffle(__FILE__, __LINE__, ::lo_ops::emulator::Exchange::kIdx, __VA_ARGS__)
#define __shfl_up_sync(...) \
  ::lo_ops::emulator::shuffle(__FILE__, __LINE__, ::lo_ops::emulator::Exchange::kUp, __VA_ARGS__)
#define __shfl_down_sync(...) \
  ::lo_ops::emulator::shuffle(__FILE__, __LINE__, ::lo_ops::emulator::Exchange::kDown, __VA_ARGS__)
#define __shfl_xor_sync(...) \
  ::lo_ops::emulator::shuffle(__FILE__, __LINE__, ::lo_ops::emulator::Exchange::kXor, __VA_ARGS__)

namespace lo_ops {
namespace emulator {
template <typename To, typename From>
inline To bit_cast(From x) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of one size");
  To out;
  std::memcpy(&out, &x, sizeof(out));
  return out;
}
}  // namespace emulator
}  // namespace lo_ops

// Half and bfloat16 storage types with the device conversions (round to nearest even).
struct __half {
  uint16_t bits;
};
struct __nv_bfloat16 {
  uint16_t bits;
};

inline float __half2float(__half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu, mantissa = h.bits & 0x3ffu;
  uint32_t bits;
  if (exponent == 0) {
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;  // 2^-24
    bits = sign | lo_ops::emulator::bit_cast<uint32_t>(magnitude);
  } else if (exponent == 31) {
    bits = sign | 0x7f800000u | (mantissa << 13);
  } else {
    bits = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  return lo_ops::emulator::bit_cast<float>(bits);
}

inline __half __float2half_rn(float f) {
  const uint32_t x = lo_ops::emulator::bit_cast<uint32_t>(f);
  const uint32_t sign = (x >> 16) & 0x8000u, magnitude = x & 0x7fffffffu;
  uint32_t h;
  if (magnitude > 0x7f800000u) {
    h = 0x7e00u | ((magnitude >> 13) & 0x3ffu);  // quiet NaN, payload kept where it fits
  } else if (magnitude >= 0x477ff000u) {  // >= 65520 (and inf): rounds to inf
    h = 0x7c00u;
  } else if (magnitude >= 0x38800000u) {  // normal half
    h = (magnitude + 0xfffu + ((magnitude >> 13) & 1u) - 0x38000000u) >> 13;
  } else if (magnitude >= 0x33000000u) {  // subnormal half, in units of 2^-24
    const uint32_t exponent = magnitude >> 23, mant = (magnitude & 0x7fffffu) | 0x800000u;
    const uint32_t shift = 126u - exponent;
    const uint32_t rest = mant & ((1u << shift) - 1u), half = 1u << (shift - 1u);
    h = mant >> shift;
    if (rest > half || (rest == half && (h & 1u))) ++h;
  } else {
    h = 0;
  }
  return __half{static_cast<uint16_t>(sign | h)};
}

inline float __bfloat162float(__nv_bfloat16 b) {
  return lo_ops::emulator::bit_cast<float>(static_cast<uint32_t>(b.bits) << 16);
}

inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  const uint32_t x = lo_ops::emulator::bit_cast<uint32_t>(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return __nv_bfloat16{static_cast<uint16_t>((x >> 16) | 0x40u)};
  return __nv_bfloat16{static_cast<uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16)};
}
