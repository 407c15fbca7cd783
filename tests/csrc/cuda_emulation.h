// CPU emulation of the CUDA features the rllc_fast kernels use, so that csrc/cuda/*_kernel(s).cuh
// compile unchanged as host C++ (tests/csrc/emulated_kernels.cpp includes this header, then them).
//
// - One std::thread per CUDA thread of a block; threadIdx, blockIdx, blockDim, gridDim are
//   thread_local. Blocks run one after another, so `__shared__` (static storage) is the running
//   block's shared memory.
// - The threads of a block run one at a time, handing over (a binary semaphore per thread) at every
//   __syncthreads, __shfl_down_sync and thread exit, in thread-index order. The schedule is thus fixed:
//   a missing __syncthreads lets warp 0 read shared memory the later warps have not written yet, on
//   every run, instead of by chance.
// - __syncthreads: a barrier of the block's live threads; __shfl_down_sync: a per-warp exchange
//   (every lane writes its value, waits for the warp, then reads lane + delta; two buffers so a fast
//   lane cannot overwrite a value still to be read); atomicAdd: std::atomic_ref.
// - Undefined behaviour the kernels must not have is an error of the launch: a barrier that some
//   threads never reach (deadlock), a shuffle whose warp has exited lanes, a mask other than full.
#pragma once
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <memory>
#include <semaphore>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct uint3 {
  unsigned x = 0, y = 0, z = 0;
};

inline thread_local uint3 threadIdx, blockIdx, blockDim, gridDim;

namespace rllc_emu {

// Thrown inside the threads of a launch that ended in an error, to unwind the kernel.
struct Abort {};

class Block {
 public:
  explicit Block(unsigned threads) : threads_(threads), state_(threads), sem_(threads), slots_(threads / 32 + 1) {
    for (auto& s : sem_) s = std::make_unique<std::binary_semaphore>(0);
    for (auto& w : slots_) w.assign(2 * 32, 0);
  }

  // Runs `kernel` for every block of `grid`, blocks in order (x fastest), threads one at a time.
  void run(uint3 grid, const std::function<void()>& kernel) {
    std::vector<std::thread> pool;
    pool.reserve(threads_);
    for (unsigned t = 0; t < threads_; ++t) pool.emplace_back([this, t, grid, &kernel] { worker(t, grid, kernel); });
    for (unsigned z = 0; z < grid.z; ++z)
      for (unsigned y = 0; y < grid.y; ++y)
        for (unsigned x = 0; x < grid.x; ++x) {
          block_ = uint3{x, y, z};
          for (auto& s : state_) s = State::Runnable;
          waiting_block_ = 0;
          waiting_warp_.assign(threads_ / 32 + 1, 0);
          shuffles_.assign(threads_, 0);
          sem_[0]->release();  // thread 0 starts the block
          done_.acquire();     // the last thread to leave ends it
        }
    quit_ = true;
    for (auto& s : sem_) s->release();
    for (auto& t : pool) t.join();
    if (!error_.empty()) throw std::runtime_error(error_);
  }

  void syncthreads() {
    const unsigned t = threadIdx.x;
    state_[t] = State::WaitBlock;
    ++waiting_block_;
    release_block_if_complete();
    hand_over(t);
  }

  template <typename T>
  T shfl_down(unsigned mask, T value, unsigned delta) {
    static_assert(sizeof(T) <= sizeof(uint64_t));
    const unsigned t = threadIdx.x, warp = t / 32, lane = t % 32;
    if (mask != 0xffffffffu) fail("__shfl_down_sync with a mask other than 0xffffffff is not emulated");
    if (threads_ % 32 != 0) fail("__shfl_down_sync in a block that is not whole warps");
    for (unsigned l = 0; l < 32; ++l)
      if (state_[warp * 32 + l] == State::Done) fail("__shfl_down_sync with exited lanes in the mask");
    const unsigned buffer = shuffles_[t]++ & 1u;
    std::memcpy(&slots_[warp][buffer * 32 + lane], &value, sizeof(T));
    state_[t] = State::WaitWarp;
    if (++waiting_warp_[warp] == 32) {
      for (unsigned l = 0; l < 32; ++l) state_[warp * 32 + l] = State::Runnable;
      waiting_warp_[warp] = 0;
    }
    hand_over(t);
    if (lane + delta >= 32) return value;
    T out;
    std::memcpy(&out, &slots_[warp][buffer * 32 + lane + delta], sizeof(T));
    return out;
  }

 private:
  enum class State { Runnable, WaitBlock, WaitWarp, Done };

  void worker(unsigned t, uint3 grid, const std::function<void()>& kernel) {
    threadIdx = uint3{t, 0, 0};
    blockDim = uint3{threads_, 1, 1};
    gridDim = grid;
    current() = this;
    while (true) {
      sem_[t]->acquire();
      if (quit_) return;
      blockIdx = block_;
      try {
        if (error_.empty()) kernel();
      } catch (const Abort&) {
      } catch (const std::exception& e) {
        set_error(e.what());
      }
      leave(t);
    }
  }

  // Thread t finished the kernel for this block: it hands the baton on, or ends the block.
  void leave(unsigned t) {
    state_[t] = State::Done;
    if (waiting_warp_[t / 32] > 0) set_error("a lane left the kernel while its warp waits in __shfl_down_sync");
    release_block_if_complete();
    int next = next_runnable(t);
    if (next < 0 && !all_done()) {  // everyone left waits at a barrier that can no longer complete
      set_error(kDeadlock);
      wake_waiters();
      next = next_runnable(t);
    }
    if (next >= 0) {
      sem_[next]->release();
    } else {
      done_.release();
    }
  }

  void release_block_if_complete() {
    unsigned live = 0;
    for (auto s : state_) live += s != State::Done;
    if (waiting_block_ > 0 && waiting_block_ == live) {
      for (auto& s : state_)
        if (s == State::WaitBlock) s = State::Runnable;
      waiting_block_ = 0;
    }
  }

  // Thread t (holding the baton, just blocked or not) hands it to the next runnable thread and waits
  // until it comes back. Once the launch has an error, every thread unwinds from here.
  void hand_over(unsigned t) {
    const int next = next_runnable(t);
    if (next < 0) {
      set_error(kDeadlock);
      wake_waiters();
      throw Abort{};  // t unwinds; leave(t) hands the baton to the woken threads, which unwind in turn
    }
    if (static_cast<unsigned>(next) != t) {
      sem_[next]->release();
      sem_[t]->acquire();
    }
    if (!error_.empty()) throw Abort{};
  }

  // The first runnable thread after t in index order, wrapping around (t itself last); -1 if none.
  int next_runnable(unsigned t) const {
    for (unsigned i = 1; i <= threads_; ++i) {
      const unsigned c = (t + i) % threads_;
      if (state_[c] == State::Runnable) return static_cast<int>(c);
    }
    return -1;
  }

  bool all_done() const {
    for (auto s : state_)
      if (s != State::Done) return false;
    return true;
  }

  void wake_waiters() {
    for (auto& s : state_)
      if (s == State::WaitBlock || s == State::WaitWarp) s = State::Runnable;
    waiting_block_ = 0;
    waiting_warp_.assign(waiting_warp_.size(), 0);
  }

  void set_error(const std::string& why) {
    if (error_.empty()) error_ = why;
  }

  [[noreturn]] void fail(const std::string& why) {
    set_error(why);
    throw Abort{};
  }

  static constexpr const char* kDeadlock =
      "deadlock: threads wait at __syncthreads or __shfl_down_sync for threads that never arrive";

 public:
  static Block*& current() {
    static thread_local Block* block = nullptr;
    return block;
  }

 private:
  unsigned threads_;
  std::vector<State> state_;
  std::vector<std::unique_ptr<std::binary_semaphore>> sem_;
  std::vector<std::vector<uint64_t>> slots_;  // per warp: two buffers of 32 lanes
  std::vector<unsigned> shuffles_;            // per thread: shuffles done (selects the buffer)
  std::vector<unsigned> waiting_warp_;
  unsigned waiting_block_ = 0;
  uint3 block_{};
  std::binary_semaphore done_{0};
  bool quit_ = false;
  std::string error_;  // written only by the thread holding the baton
};

// Runs kernel() over grid x threads (1-D blocks); throws std::runtime_error if the launch went wrong.
inline void launch(uint3 grid, unsigned threads, const std::function<void()>& kernel) {
  Block(threads).run(grid, kernel);
}

}  // namespace rllc_emu

inline void __syncthreads() { rllc_emu::Block::current()->syncthreads(); }

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  return rllc_emu::Block::current()->shfl_down(mask, value, delta);
}

inline float atomicAdd(float* address, float value) { return std::atomic_ref<float>(*address).fetch_add(value); }
