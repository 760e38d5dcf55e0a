// Settings and counters of the CUDA emulator (runtime.cpp), for its torch ops (ops.cpp).
#pragma once

#include <cstdint>

namespace lo_ops {
namespace emulator {

enum class Schedule { kLockstep, kAdversarial };

struct Config {
  Schedule schedule = Schedule::kLockstep;
  uint64_t seed = 0;
};

struct Stats {
  int64_t launches = 0, blocks = 0, threads = 0, switches = 0, barriers = 0, exchanges = 0;
};

// Sets the schedule and restarts its random sequence from `seed`.
void configure(const Config& config);
Stats stats();

}  // namespace emulator
}  // namespace lo_ops
