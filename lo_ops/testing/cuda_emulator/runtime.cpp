// The CUDA emulator's runtime (emulator.h): fibers, the block scheduler, barriers and warp
// exchanges, and the checks that turn misuse of them into errors.
#include "emulator.h"

#include <cxxabi.h>
#include <dlfcn.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <cstdlib>
#include <exception>
#include <memory>
#include <mutex>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

#if !defined(__x86_64__)
#include <ucontext.h>
#endif

#include "control.h"

// Statics of the device code (its __shared__ variables) are gathered between these symbols by
// shared_memory.ld.
extern "C" char __start_lo_ops_emulator_shared[] __attribute__((weak, visibility("hidden")));
extern "C" char __stop_lo_ops_emulator_shared[] __attribute__((weak, visibility("hidden")));

#if defined(__x86_64__)
// switch(save, load): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save and resumes the context saved at `load`.
// A new context starts in lo_ops_emulator_start, which calls the fiber's main function.
extern "C" void lo_ops_emulator_switch(void** save, void* load);
extern "C" void lo_ops_emulator_start();
asm(R"(
  .pushsection .text
  .p2align 4
  .globl lo_ops_emulator_switch
  .hidden lo_ops_emulator_switch
  .type lo_ops_emulator_switch, @function
lo_ops_emulator_switch:
  pushq %rbp
  pushq %rbx
  pushq %r12
  pushq %r13
  pushq %r14
  pushq %r15
  subq $8, %rsp
  stmxcsr (%rsp)
  fnstcw 4(%rsp)
  movq %rsp, (%rdi)
  movq %rsi, %rsp
  ldmxcsr (%rsp)
  fldcw 4(%rsp)
  addq $8, %rsp
  popq %r15
  popq %r14
  popq %r13
  popq %r12
  popq %rbx
  popq %rbp
  ret
  .size lo_ops_emulator_switch, .-lo_ops_emulator_switch
  .p2align 4
  .globl lo_ops_emulator_start
  .hidden lo_ops_emulator_start
  .type lo_ops_emulator_start, @function
lo_ops_emulator_start:
  call lo_ops_emulator_fiber_main
  ud2
  .size lo_ops_emulator_start, .-lo_ops_emulator_start
  .popsection
)");
#endif

extern "C" __attribute__((visibility("hidden"), noreturn)) void lo_ops_emulator_fiber_main();

namespace lo_ops {
namespace emulator {
namespace {

constexpr std::size_t kStackBytes = 256 * 1024;
constexpr unsigned kMaxThreadsPerBlock = 1024;

enum class State { kReady, kBarrier, kWarp, kExited };

struct Thread {
  void* sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t context;
#endif
  uint3 idx{0, 0, 0};
  int warp = 0, lane = 0;
  State state = State::kReady;
  int barrier_result = 0;
  // The call this lane waits in (kWarp): its arguments, and its result once the call is done.
  Exchange exchange = Exchange::kIdx;
  int lane_arg = 0, width = warpSize;
  uint64_t bits = 0;
};

struct Warp {
  unsigned exists = 0;  // lanes of this warp that the block has
  unsigned live = 0;    // lanes that have not exited
  unsigned arrived = 0;  // lanes waiting in the current call
  unsigned mask = 0;
  Exchange kind = Exchange::kIdx;
  const char* file = nullptr;
  int line = 0;
};

struct Stack {
  char* base = nullptr;  // guard page first
  std::size_t bytes = 0;
};

const char* barrier_name(Barrier kind) {
  switch (kind) {
    case Barrier::kSync:
      return "__syncthreads";
    case Barrier::kAnd:
      return "__syncthreads_and";
    case Barrier::kOr:
      return "__syncthreads_or";
    case Barrier::kCount:
      return "__syncthreads_count";
  }
  return "barrier";
}

const char* exchange_name(Exchange kind) {
  switch (kind) {
    case Exchange::kIdx:
      return "__shfl_sync";
    case Exchange::kUp:
      return "__shfl_up_sync";
    case Exchange::kDown:
      return "__shfl_down_sync";
    case Exchange::kXor:
      return "__shfl_xor_sync";
    case Exchange::kSyncWarp:
      return "__syncwarp";
  }
  return "warp exchange";
}

std::string where(const char* file, int line) {
  std::string f = file ? file : "?";
  const auto slash = f.find_last_of('/');
  if (slash != std::string::npos) f = f.substr(slash + 1);
  return f + ":" + std::to_string(line);
}

std::string hex(unsigned mask) {
  std::ostringstream os;
  os << "0x" << std::hex << mask;
  return os.str();
}

std::string lanes_of(unsigned mask) {
  std::string out;
  for (int l = 0; l < 32; ++l)
    if (mask & (1u << l)) out += (out.empty() ? "" : ",") + std::to_string(l);
  return "{" + out + "}";
}

std::string kernel_name(const void* kernel) {
  Dl_info info;
  if (dladdr(kernel, &info) == 0 || info.dli_sname == nullptr) return "kernel";
  int status = 0;
  std::unique_ptr<char, void (*)(void*)> demangled(
      abi::__cxa_demangle(info.dli_sname, nullptr, nullptr, &status), std::free);
  return status == 0 && demangled ? demangled.get() : info.dli_sname;
}

struct DeviceError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// Everything of the running launch; one launch at a time (run_grid holds the mutex).
struct Emulator {
  std::mutex mutex;
  Config config;
  Stats stats;
  std::mt19937_64 rng{0};

  // the launch
  dim3 grid, block;
  Body body = nullptr;
  void* ctx = nullptr;
  // the block
  uint3 block_idx{0, 0, 0};
  std::vector<Thread> threads;
  std::vector<Warp> warps;
  std::vector<Stack> stacks;
  int exited = 0;
  int waiting = 0;  // threads at the current barrier
  Barrier barrier_kind = Barrier::kSync;
  const char* barrier_file = nullptr;
  int barrier_line = 0, barrier_value = 0;
  Thread* current = nullptr;
  void* scheduler_sp = nullptr;
#if !defined(__x86_64__)
  ucontext_t scheduler_context;
#endif
  std::exception_ptr error;
  uint32_t mxcsr_fcw[2] = {0x1f80u, 0x037fu};
};

Emulator& emu() {
  static Emulator* e = new Emulator();  // never destroyed: fibers may outlive static teardown
  return *e;
}

std::string thread_name(const Thread& t) {
  const Emulator& e = emu();
  std::ostringstream os;
  os << "thread (" << t.idx.x << "," << t.idx.y << "," << t.idx.z << ") of block ("
     << e.block_idx.x << "," << e.block_idx.y << "," << e.block_idx.z << ")";
  return os.str();
}

[[noreturn]] void fail(const std::string& what) { throw DeviceError(what); }

Thread& self() {
  Thread* t = emu().current;
  if (t == nullptr) fail("CUDA device code called outside an emulated launch");
  return *t;
}

// Back to the scheduler; returns when the scheduler resumes this thread.
void yield() {
  Emulator& e = emu();
  Thread& t = *e.current;
#if defined(__x86_64__)
  lo_ops_emulator_switch(&t.sp, e.scheduler_sp);
#else
  swapcontext(&t.context, &e.scheduler_context);
#endif
}

void resume(Thread& t) {
  Emulator& e = emu();
  e.current = &t;
  ++e.stats.switches;
#if defined(__x86_64__)
  lo_ops_emulator_switch(&e.scheduler_sp, t.sp);
#else
  swapcontext(&e.scheduler_context, &t.context);
#endif
  e.current = nullptr;
}

// A thread that leaves the kernel: nobody may be left waiting for it.
void thread_exits(Thread& t) {
  Emulator& e = emu();
  t.state = State::kExited;
  ++e.exited;
  Warp& w = e.warps[t.warp];
  w.live &= ~(1u << t.lane);
  if (e.waiting > 0)
    fail(thread_name(t) + " exits while " + std::to_string(e.waiting) + " threads of its block wait at " +
         barrier_name(e.barrier_kind) + " (" + where(e.barrier_file, e.barrier_line) +
         "): a barrier that some threads never reach");
  if (w.arrived != 0 && (w.mask & (1u << t.lane)))
    fail(thread_name(t) + " (lane " + std::to_string(t.lane) + ") exits while lanes " + lanes_of(w.arrived) +
         " of its warp wait for it at " + exchange_name(w.kind) + " (" + where(w.file, w.line) +
         ") with mask " + hex(w.mask));
}

void prepare_stack(Thread& t, Stack& s) {
#if defined(__x86_64__)
  // [mxcsr, fcw][r15 r14 r13 r12 rbx rbp][return address: lo_ops_emulator_start][pad]; after
  // the switch's ret the stack pointer is 16-byte aligned, as at a call.
  char* top = reinterpret_cast<char*>(reinterpret_cast<uintptr_t>(s.base + s.bytes) & ~uintptr_t{15});
  char* sp = top - 80;
  std::memset(sp, 0, 80);
  std::memcpy(sp, emu().mxcsr_fcw, sizeof(uint32_t));
  const uint16_t fcw = static_cast<uint16_t>(emu().mxcsr_fcw[1]);
  std::memcpy(sp + 4, &fcw, sizeof(fcw));
  void (*start)() = lo_ops_emulator_start;
  std::memcpy(sp + 56, &start, sizeof(start));
  t.sp = sp;
#else
  getcontext(&t.context);
  const long page = sysconf(_SC_PAGESIZE);
  t.context.uc_stack.ss_sp = s.base + page;
  t.context.uc_stack.ss_size = s.bytes - page;
  t.context.uc_link = nullptr;
  makecontext(&t.context, reinterpret_cast<void (*)()>(lo_ops_emulator_fiber_main), 0);
#endif
}

void ensure_stacks(std::size_t n) {
  Emulator& e = emu();
  const std::size_t page = static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
  while (e.stacks.size() < n) {
    const std::size_t bytes = kStackBytes + page;
    void* mem = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED) throw std::runtime_error("lo_ops CUDA emulator: cannot map a thread stack");
    mprotect(mem, page, PROT_NONE);  // a guard page below each stack
    e.stacks.push_back(Stack{static_cast<char*>(mem), bytes});
  }
}

// The ready threads of warp w (bit per lane).
unsigned ready_lanes(const Emulator& e, int w) {
  unsigned ready = 0;
  const int first = w * warpSize;
  const int last = std::min<int>(first + warpSize, static_cast<int>(e.threads.size()));
  for (int i = first; i < last; ++i)
    if (e.threads[i].state == State::kReady) ready |= 1u << (i - first);
  return ready;
}

[[noreturn]] void deadlock() {
  Emulator& e = emu();
  std::ostringstream os;
  os << "deadlock in block (" << e.block_idx.x << "," << e.block_idx.y << "," << e.block_idx.z << "):";
  if (e.waiting > 0)
    os << " " << e.waiting << " threads wait at " << barrier_name(e.barrier_kind) << " ("
       << where(e.barrier_file, e.barrier_line) << ");";
  for (std::size_t w = 0; w < e.warps.size(); ++w)
    if (e.warps[w].arrived)
      os << " lanes " << lanes_of(e.warps[w].arrived) << " of warp " << w << " wait at "
         << exchange_name(e.warps[w].kind) << " (" << where(e.warps[w].file, e.warps[w].line)
         << ") for lanes " << lanes_of(e.warps[w].mask & ~e.warps[w].arrived) << ";";
  os << " " << e.exited << " threads have exited";
  fail(os.str());
}

// Runs one block to its end under the configured schedule.
void run_block(uint3 block_idx) {
  Emulator& e = emu();
  const unsigned n = e.block.x * e.block.y * e.block.z;
  e.block_idx = block_idx;
  e.threads.assign(n, Thread{});
  e.warps.assign((n + warpSize - 1) / warpSize, Warp{});
  e.exited = 0;
  e.waiting = 0;
  for (unsigned i = 0; i < n; ++i) {
    Thread& t = e.threads[i];
    t.idx = uint3{i % e.block.x, (i / e.block.x) % e.block.y, i / (e.block.x * e.block.y)};
    t.warp = static_cast<int>(i / warpSize);
    t.lane = static_cast<int>(i % warpSize);
    e.warps[t.warp].exists |= 1u << t.lane;
    prepare_stack(t, e.stacks[i]);
  }
  for (Warp& w : e.warps) w.live = w.exists;
  // Fresh, poisoned shared memory: 0xFF bytes read as NaN in float and double.
  if (__start_lo_ops_emulator_shared != nullptr)
    std::memset(__start_lo_ops_emulator_shared, 0xff,
                static_cast<std::size_t>(__stop_lo_ops_emulator_shared - __start_lo_ops_emulator_shared));
  ++e.stats.blocks;
  e.stats.threads += n;
  const auto check = [&] {
    if (e.error) std::rethrow_exception(e.error);
  };
  if (e.config.schedule == Schedule::kLockstep) {
    for (;;) {
      bool ran = false;
      for (Thread& t : e.threads) {
        if (t.state != State::kReady) continue;
        resume(t);
        check();
        ran = true;
      }
      if (!ran) {
        if (e.exited == static_cast<int>(n)) return;
        deadlock();
      }
    }
  }
  std::vector<int> candidates;
  for (;;) {
    candidates.clear();
    for (int w = 0; w < static_cast<int>(e.warps.size()); ++w)
      if (ready_lanes(e, w)) candidates.push_back(w);
    if (candidates.empty()) {
      if (e.exited == static_cast<int>(n)) return;
      deadlock();
    }
    const int w = candidates[std::uniform_int_distribution<std::size_t>(0, candidates.size() - 1)(e.rng)];
    // This warp alone, until none of its lanes can go on.
    for (unsigned ready; (ready = ready_lanes(e, w)) != 0;) {
      int pick = std::uniform_int_distribution<int>(0, __builtin_popcount(ready) - 1)(e.rng);
      int lane = 0;
      for (; lane < warpSize; ++lane)
        if ((ready & (1u << lane)) && pick-- == 0) break;
      resume(e.threads[w * warpSize + lane]);
      check();
    }
  }
}

}  // namespace

const uint3& thread_idx() { return self().idx; }
const uint3& block_idx() {
  self();
  return emu().block_idx;
}
const dim3& block_dim() {
  self();
  return emu().block;
}
const dim3& grid_dim() {
  self();
  return emu().grid;
}

int block_barrier(Barrier kind, int value, const char* file, int line) {
  Emulator& e = emu();
  Thread& t = self();
  if (e.exited > 0)
    fail(thread_name(t) + " reaches " + barrier_name(kind) + " (" + where(file, line) + ") after " +
         std::to_string(e.exited) + " threads of its block exited: a barrier that some threads never reach");
  const Warp& own = e.warps[t.warp];
  if (own.arrived && (own.mask & (1u << t.lane)))
    fail(thread_name(t) + " reaches " + barrier_name(kind) + " (" + where(file, line) +
         ") while lanes " + lanes_of(own.arrived) + " of its warp wait for it at " +
         exchange_name(own.kind) + " (" + where(own.file, own.line) + ")");
  if (e.waiting == 0) {
    e.barrier_kind = kind;
    e.barrier_file = file;
    e.barrier_line = line;
    e.barrier_value = kind == Barrier::kAnd ? 1 : 0;
  } else if (kind != e.barrier_kind) {
    fail(thread_name(t) + " reaches " + barrier_name(kind) + " (" + where(file, line) + ") while " +
         std::to_string(e.waiting) + " threads wait at " + barrier_name(e.barrier_kind) + " (" +
         where(e.barrier_file, e.barrier_line) + "): mixed barrier kinds");
  } else if (line != e.barrier_line || std::strcmp(file, e.barrier_file) != 0) {
    fail(thread_name(t) + " reaches " + barrier_name(kind) + " at " + where(file, line) + " while " +
         std::to_string(e.waiting) + " threads wait at the one at " + where(e.barrier_file, e.barrier_line) +
         ": divergent barriers");
  }
  switch (kind) {
    case Barrier::kSync:
      break;
    case Barrier::kAnd:
      e.barrier_value = e.barrier_value && value;
      break;
    case Barrier::kOr:
      e.barrier_value = e.barrier_value || value;
      break;
    case Barrier::kCount:
      e.barrier_value += value != 0;
      break;
  }
  t.state = State::kBarrier;
  if (++e.waiting == static_cast<int>(e.threads.size())) {
    for (Thread& u : e.threads) {
      u.state = State::kReady;
      u.barrier_result = e.barrier_value;
    }
    e.waiting = 0;
    ++e.stats.barriers;
  }
  yield();
  return t.barrier_result;
}

uint64_t warp_exchange(Exchange kind, unsigned mask, uint64_t bits, int lane_arg, int width,
                       const char* file, int line) {
  Emulator& e = emu();
  Thread& t = self();
  Warp& w = e.warps[t.warp];
  const unsigned me = 1u << t.lane;
  const std::string call = std::string(exchange_name(kind)) + " (" + where(file, line) + ")";
  if (!(mask & me))
    fail(thread_name(t) + " calls " + call + " with mask " + hex(mask) + ", which omits its own lane " +
         std::to_string(t.lane));
  if (mask & ~w.exists)
    fail(thread_name(t) + " calls " + call + " with mask " + hex(mask) + " naming lanes " +
         lanes_of(mask & ~w.exists) + " that its warp does not have");
  if (mask & ~w.live)
    fail(thread_name(t) + " calls " + call + " with mask " + hex(mask) + " naming lanes " +
         lanes_of(mask & ~w.live) + " that have exited");
  if (width <= 0 || width > warpSize || (width & (width - 1)) != 0)
    fail(thread_name(t) + " calls " + call + " with width " + std::to_string(width) +
         " (a power of two up to 32)");
  for (int l = 0; l < warpSize; ++l) {
    if (!(mask & (1u << l))) continue;
    const Thread& u = e.threads[static_cast<std::size_t>(t.warp) * warpSize + l];
    if (u.state == State::kBarrier)
      fail(thread_name(t) + " calls " + call + " naming lane " + std::to_string(l) + ", which waits at " +
           barrier_name(e.barrier_kind) + " (" + where(e.barrier_file, e.barrier_line) + ")");
  }
  if (w.arrived == 0) {
    w.mask = mask;
    w.kind = kind;
    w.file = file;
    w.line = line;
  } else if (mask != w.mask || kind != w.kind || line != w.line || std::strcmp(file, w.file) != 0) {
    fail(thread_name(t) + " calls " + call + " with mask " + hex(mask) + " while lanes " + lanes_of(w.arrived) +
         " of its warp wait at " + exchange_name(w.kind) + " (" + where(w.file, w.line) + ") with mask " +
         hex(w.mask));
  }
  t.exchange = kind;
  t.lane_arg = lane_arg;
  t.width = width;
  t.bits = bits;
  t.state = State::kWarp;
  w.arrived |= me;
  if (w.arrived == w.mask) {
    // Every named lane is here: each reads its source lane's value now.
    Thread* lanes = &e.threads[static_cast<std::size_t>(t.warp) * warpSize];
    uint64_t published[warpSize];
    for (int l = 0; l < warpSize; ++l)
      if (mask & (1u << l)) published[l] = lanes[l].bits;
    for (int l = 0; l < warpSize; ++l) {
      if (!(mask & (1u << l))) continue;
      Thread& u = lanes[l];
      const int base = l & ~(u.width - 1), offset = l - base;
      int src = l;
      switch (u.exchange) {
        case Exchange::kIdx:
          src = base + (u.lane_arg & (u.width - 1));
          break;
        case Exchange::kUp:
          src = offset >= u.lane_arg ? l - u.lane_arg : l;
          break;
        case Exchange::kDown:
          src = offset + u.lane_arg < u.width ? l + u.lane_arg : l;
          break;
        case Exchange::kXor: {
          const int x = l ^ u.lane_arg;
          src = x >= base && x < base + u.width ? x : l;
          break;
        }
        case Exchange::kSyncWarp:
          break;
      }
      if (!(mask & (1u << src)))
        fail(thread_name(u) + " reads lane " + std::to_string(src) + " at " + call + ", which is not in mask " +
             hex(mask));
      u.bits = published[src];
      u.state = State::kReady;
    }
    w.arrived = 0;
    ++e.stats.exchanges;
  }
  yield();
  return t.bits;
}

void run_grid(const void* kernel, dim3 grid, dim3 block, std::size_t dynamic_shared,
              std::size_t param_bytes, Body body, void* ctx) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  const auto launch_error = [&](const std::string& what) {
    throw std::runtime_error("lo_ops CUDA emulator: launching " + kernel_name(kernel) + ": " + what);
  };
  const uint64_t threads = uint64_t{block.x} * block.y * block.z;
  if (grid.x == 0 || grid.y == 0 || grid.z == 0 || block.x == 0 || block.y == 0 || block.z == 0)
    launch_error("invalid configuration argument (a grid or block dimension is 0)");
  if (threads > kMaxThreadsPerBlock || block.z > 64)
    launch_error("invalid configuration argument (" + std::to_string(threads) + " threads per block)");
  if (grid.y > 65535 || grid.z > 65535)
    launch_error("invalid configuration argument (grid.y and grid.z are at most 65535)");
  if (param_bytes > kParamBytes)
    launch_error(std::to_string(param_bytes) + " bytes of kernel parameters exceed the " +
                 std::to_string(kParamBytes) + " this CUDA runtime allows");
  if (dynamic_shared != 0) launch_error("dynamic shared memory is not emulated");
#if defined(__x86_64__)
  asm volatile("stmxcsr %0" : "=m"(e.mxcsr_fcw[0]));
  uint16_t fcw;
  asm volatile("fnstcw %0" : "=m"(fcw));
  e.mxcsr_fcw[1] = fcw;
#endif
  ensure_stacks(threads);
  e.grid = grid;
  e.block = block;
  e.body = body;
  e.ctx = ctx;
  e.error = nullptr;
  ++e.stats.launches;
  const uint64_t blocks = uint64_t{grid.x} * grid.y * grid.z;
  // Block order: in order, or a random permutation (i -> (a i + b) mod blocks, a coprime).
  uint64_t a = 1, b = 0;
  if (e.config.schedule == Schedule::kAdversarial && blocks > 1) {
    b = std::uniform_int_distribution<uint64_t>(0, blocks - 1)(e.rng);
    do {
      a = std::uniform_int_distribution<uint64_t>(1, blocks - 1)(e.rng);
    } while (std::gcd(a, blocks) != 1);
  }
  try {
    for (uint64_t i = 0; i < blocks; ++i) {
      const uint64_t k = static_cast<uint64_t>((static_cast<unsigned __int128>(a) * i + b) % blocks);
      run_block(uint3{static_cast<unsigned>(k % grid.x), static_cast<unsigned>((k / grid.x) % grid.y),
                      static_cast<unsigned>(k / (uint64_t{grid.x} * grid.y))});
    }
  } catch (const DeviceError& err) {
    e.current = nullptr;
    throw std::runtime_error("lo_ops CUDA emulator: " + kernel_name(kernel) + ": " + err.what());
  } catch (const std::exception& err) {
    e.current = nullptr;
    throw std::runtime_error("lo_ops CUDA emulator: " + kernel_name(kernel) + ": device code threw: " +
                             err.what());
  }
}

void configure(const Config& config) {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  e.config = config;
  e.rng.seed(config.seed);
}

Stats stats() {
  Emulator& e = emu();
  std::lock_guard<std::mutex> lock(e.mutex);
  return e.stats;
}

}  // namespace emulator
}  // namespace lo_ops

// Every fiber starts here: the kernel body as this thread, then its exit.
extern "C" void lo_ops_emulator_fiber_main() {
  using namespace lo_ops::emulator;
  Emulator& e = emu();
  try {
    e.body(e.ctx);
    thread_exits(*e.current);
  } catch (...) {
    if (!e.error) e.error = std::current_exception();
    e.current->state = State::kExited;
  }
  yield();
  std::abort();  // an exited thread is never resumed
}
