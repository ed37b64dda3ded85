// Device probes for benchmarks and tests (not used by the engine): what the memory system gives a kernel that only
// reads, the ceiling the weight-streaming kernels (the experts, lm_head, the DeltaNet state's read half) are held to.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace ds::cuda {

// Reads bytes (a multiple of 16; p 16-byte aligned) once with 16-byte loads, 4 in flight per thread, over `blocks`
// blocks of 256 threads (0: 8 per SM); writes one word to *sink only if the XOR of everything read is a value no test
// uses, so the loads cannot be dropped. One launch on s.
void read_stream(const void* p, int64_t bytes, uint32_t* sink, int blocks, cudaStream_t s);

// The rate of `mma.sync.m16n8k16` (bf16 inputs, fp32 accumulators: the decode kernels' tensor instruction) on the
// current device, in FLOP/s: one launch of 16 warps per SM, each issuing `iters` × 8 mma on 8 independent
// accumulators from registers (no memory traffic), timed with events on s (synchronises it). The ceiling for the
// mma.sync kernels, as the bf16 matmul is for cuBLAS (H200, session 37: ~645 TFLOP/s, 6.6 cycles per mma per
// scheduler; one dependent chain per warp: ~31 cycles per mma).
double mma_sync_rate(int iters, cudaStream_t s);

// A memory reader beside measured work, to see how that work behaves with less of the device's bandwidth (`bench
// --variants "name:hog=N"`: an H200 with part of its bandwidth taken, standing in for an H100's 3.35 TB/s against
// 4.8). One block of 1024 threads on each of n SMs — all of an SM's shared memory per block, so one per SM and no
// block of another kernel that uses shared memory beside it — reads `bytes` of its own buffer over and over with
// 16-byte loads, on a non-blocking stream of its own, from start() until stop(). The measured work runs on the other
// SMs with what bandwidth is left. stop() returns the bytes per second the hog read while it ran. A kernel launched
// for the first time in the process waits for the hog to end (CUDA loads modules lazily, and loading one waits for
// the running kernels: the test's first read beside it took the hog's full 60 s): run what goes beside it once
// first. A hog still running 60 s after its start stops by itself (a forgotten stop, or a cudaDeviceSynchronize
// that would otherwise wait for it forever). read = false: the blocks hold their SMs without reading (what taking the SMs alone costs the
// measured work, to tell apart from what taking the bandwidth costs). Not for the engine.
class ReadHog {
 public:
  ReadHog(int n, int64_t bytes, bool read = true);
  ~ReadHog();
  ReadHog(const ReadHog&) = delete;
  ReadHog& operator=(const ReadHog&) = delete;
  void start();
  double stop();
  int sms() const { return n_; }

 private:
  int n_;
  int64_t bytes_;
  bool read_;
  int smem_ = 0;  // dynamic shared memory per block: all an SM gives one block
  void* buf_ = nullptr;
  unsigned long long* count_ = nullptr;  // device: bytes read (each block adds its own at exit)
  uint32_t* sink_ = nullptr;
  int* flag_dev_ = nullptr;  // device memory: 1 = stop (the kernel polls it)
  int* one_ = nullptr;       // pinned host memory holding 1, copied into flag_dev_ by stop() on ctl_
  cudaStream_t s_ = nullptr, ctl_ = nullptr;
  cudaEvent_t e0_ = nullptr, e1_ = nullptr;
  bool running_ = false;
};

}  // namespace ds::cuda
