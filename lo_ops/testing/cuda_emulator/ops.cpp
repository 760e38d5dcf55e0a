// The CUDA emulator as a torch extension (built on first use by lo_ops.testing): ops.cu,
// compiled as host C++ against the emulator's CUDA headers, registers the CUDA kernels of every
// lo_ops op as CPU kernels of the library lo_ops_cuda_emulated (whose schemas lo_ops.testing
// copies from lo_ops), and lo_ops_cuda_emulator holds the emulator's own ops.
#define LO_OPS_CUDA_EMULATOR 1
#define LO_OPS_CUDA_LIBRARY lo_ops_cuda_emulated
#define LO_OPS_CUDA_DISPATCH_KEY CPU
#include "cuda/ops.cu"

#include <string>
#include <vector>

#include "control.h"

namespace lo_ops {
namespace emulator {

at::Tensor run_probe(const std::string& name, int64_t blocks, int64_t threads);  // probes.cpp

namespace {

void configure_op(const std::string& schedule, int64_t seed) {
  Config config;
  if (schedule == "lockstep") {
    config.schedule = Schedule::kLockstep;
  } else if (schedule == "adversarial") {
    config.schedule = Schedule::kAdversarial;
  } else {
    TORCH_CHECK(false, "lo_ops CUDA emulator: schedule must be 'lockstep' or 'adversarial', got '",
                schedule, "'");
  }
  config.seed = static_cast<uint64_t>(seed);
  configure(config);
}

std::vector<int64_t> stats_op() {
  const Stats s = stats();
  return {s.launches, s.blocks, s.threads, s.switches, s.barriers, s.exchanges};
}

// x (float32) stored as `dtype` ("float16" or "bfloat16") with the device conversions and read
// back as float32, for comparison with torch's own conversions.
at::Tensor round_trip_op(const at::Tensor& x, const std::string& dtype) {
  TORCH_CHECK(x.scalar_type() == at::kFloat, "round_trip: x must be float32");
  TORCH_CHECK(dtype == "float16" || dtype == "bfloat16", "round_trip: dtype must be float16 or bfloat16, got ",
              dtype);
  const at::Tensor in = x.contiguous();
  at::Tensor out = at::empty_like(in);
  const float* src = in.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  for (int64_t i = 0; i < in.numel(); ++i)
    dst[i] = dtype == "float16" ? __half2float(__float2half_rn(src[i]))
                                : __bfloat162float(__float2bfloat16_rn(src[i]));
  return out;
}

std::vector<int64_t> table_capacity_op() {
  return {cuda::kMaxTensors, cuda::kMaxStatsTensors, static_cast<int64_t>(kParamBytes)};
}

}  // namespace

TORCH_LIBRARY(lo_ops_cuda_emulator, m) {
  // Schedule of the emulated launches that follow ('lockstep' or 'adversarial') and the seed of
  // the adversarial schedule's random choices.
  m.def("configure(str schedule, int seed) -> ()", &configure_op);
  // Counters since the library was loaded: launches, blocks, threads, context switches,
  // completed block barriers, completed warp exchanges.
  m.def("stats() -> int[]", &stats_op);
  // Tensors per launch table of the per-element kernels and of the statistics kernel, and the
  // bytes of kernel parameters the emulated CUDA runtime allows.
  m.def("table_capacity() -> int[]", &table_capacity_op);
  // The emulator's float16 / bfloat16 device conversions, there and back (round to nearest even).
  m.def("round_trip(Tensor x, str dtype) -> Tensor", &round_trip_op);
  // Runs one of the emulator's probe kernels (probes.cpp) on <<<blocks, threads>>> and returns
  // what it wrote, or raises the error the emulator detected.
  m.def("probe(str name, int blocks, int threads) -> Tensor", &run_probe);
}

}  // namespace emulator
}  // namespace lo_ops
