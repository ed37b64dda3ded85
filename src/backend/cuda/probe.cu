// Device probes (probe.h).
#include "backend/cuda/probe.h"

#include "backend/cuda/cuda_check.h"
#include "backend/cuda/mma_util.cuh"
#include "core/status.h"

namespace ds::cuda {
namespace {

__global__ void __launch_bounds__(256) k_read_stream(const uint4* __restrict__ p, int64_t n, uint32_t* sink) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x;
  uint32_t acc = 0;
  int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  for (; i + 3 * stride < n; i += 4 * stride) {
    uint4 v[4];
#pragma unroll
    for (int u = 0; u < 4; ++u) v[u] = __ldg(p + i + u * stride);
#pragma unroll
    for (int u = 0; u < 4; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
  }
  for (; i < n; i += stride) {
    const uint4 v = __ldg(p + i);
    acc ^= v.x ^ v.y ^ v.z ^ v.w;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
}

// Each warp: kChains independent m16n8k16 accumulators, fed the same registers (values do not change the rate); the
// sums go to *sink only if they equal a value no launch produces, so nothing is dropped.
constexpr int kChains = 8;
__global__ void __launch_bounds__(512) k_mma_sync_rate(int iters, float* sink) {
  const uint32_t x = threadIdx.x, a[4] = {x, x * 3u, x * 5u, x * 7u}, b0 = x * 11u, b1 = x * 13u;
  float c[kChains][4] = {};
  for (int i = 0; i < iters; ++i) {
#pragma unroll
    for (int j = 0; j < kChains; ++j) mma16816(c[j], a, b0, b1);  // the decode kernels' instruction (mma_util.cuh)
  }
  float t = 0.f;
#pragma unroll
  for (int j = 0; j < kChains; ++j) t += (c[j][0] + c[j][1]) + (c[j][2] + c[j][3]);
  if (t == 1234.5f) *sink = t;
}

// ReadHog's reader: each block walks its own part of the buffer, 12 loads of 16 bytes in flight per thread per round,
// and thread 0 looks at the stop flag (device memory, which stop() sets by a copy on another stream: polling mapped
// host memory instead slowed the work on the other SMs 3-10x, H200 session 38) every 16 rounds, or every
// microsecond without reading; stops by itself after limit_ns of the global timer.
constexpr int kHogThreads = 1024, kHogUnroll = 12, kHogCheck = 16;
__global__ void __launch_bounds__(kHogThreads, 1)
    k_read_hog(const uint4* __restrict__ p, int64_t n, const volatile int* stop, unsigned long long* count,
               uint32_t* sink, uint64_t limit_ns, bool read) {
  __shared__ int quit;
  const int64_t per = n / gridDim.x, base = per * blockIdx.x;
  const int64_t round = int64_t(kHogThreads) * kHogUnroll;
  uint64_t t0 = 0;
  if (threadIdx.x == 0) {
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
    quit = 0;
  }
  __syncthreads();
  uint32_t acc = 0;
  unsigned long long rounds = 0;
  int64_t off = 0;
  for (;;) {
    if (!read) __nanosleep(1000);
    for (int c = 0; c < kHogCheck && read; ++c) {
      if (off + round > per) off = 0;
      uint4 v[kHogUnroll];
#pragma unroll
      for (int u = 0; u < kHogUnroll; ++u) v[u] = __ldcg(p + base + off + u * kHogThreads + threadIdx.x);
#pragma unroll
      for (int u = 0; u < kHogUnroll; ++u) acc ^= v[u].x ^ v[u].y ^ v[u].z ^ v[u].w;
      off += round;
      ++rounds;
    }
    if (threadIdx.x == 0) {
      uint64_t t;
      asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
      quit = *stop != 0 || t - t0 > limit_ns;
    }
    __syncthreads();
    const int q = quit;
    __syncthreads();  // quit is rewritten only after every thread has read it
    if (q) break;
  }
  if (acc == 0x9e3779b9u) *sink = acc;
  if (threadIdx.x == 0) atomicAdd(count, rounds * (unsigned long long)round * 16ull);
}
// The hog's dynamic shared memory: all a block may take (opt-in) less room for its static `quit` word.
int hog_smem() {
  int dev = 0, optin = 0;
  DS_CUDA_CHECK(cudaGetDevice(&dev));
  DS_CUDA_CHECK(cudaDeviceGetAttribute(&optin, cudaDevAttrMaxSharedMemoryPerBlockOptin, dev));
  return optin - 256;
}

}  // namespace

double mma_sync_rate(int iters, cudaStream_t s) {
  DS_CHECK(iters > 0, "mma_sync_rate: iters must be positive, got ", iters);
  float* sink = nullptr;
  DS_CUDA_CHECK(cudaMalloc(&sink, sizeof(float)));
  const int blocks = device_sm_count(), threads = 512;
  k_mma_sync_rate<<<blocks, threads, 0, s>>>(16, sink);  // warm-up
  DS_CUDA_CHECK(cudaGetLastError());
  cudaEvent_t e0, e1;
  DS_CUDA_CHECK(cudaEventCreate(&e0));
  DS_CUDA_CHECK(cudaEventCreate(&e1));
  DS_CUDA_CHECK(cudaEventRecord(e0, s));
  k_mma_sync_rate<<<blocks, threads, 0, s>>>(iters, sink);
  DS_CUDA_CHECK(cudaGetLastError());
  DS_CUDA_CHECK(cudaEventRecord(e1, s));
  DS_CUDA_CHECK(cudaEventSynchronize(e1));
  float ms = 0.f;
  DS_CUDA_CHECK(cudaEventElapsedTime(&ms, e0, e1));
  DS_CUDA_CHECK(cudaEventDestroy(e0));
  DS_CUDA_CHECK(cudaEventDestroy(e1));
  DS_CUDA_CHECK(cudaFree(sink));
  const double mmas = double(blocks) * (threads / 32) * double(iters) * kChains;
  return mmas * (2.0 * 16 * 8 * 16) / (double(ms) * 1e-3);
}

ReadHog::ReadHog(int n, int64_t bytes, bool read) : n_(n), bytes_(bytes), read_(read) {
  DS_CHECK(n >= 1 && n < device_sm_count(), "ReadHog: expected 1 to ", device_sm_count() - 1, " SMs, got ", n);
  const int64_t round = int64_t(kHogThreads) * kHogUnroll * 16;
  DS_CHECK(bytes >= round * n, "ReadHog: expected at least ", round * n, " bytes for ", n, " SMs, got ", bytes);
  DS_CUDA_CHECK(cudaMalloc(&buf_, size_t(bytes)));
  DS_CUDA_CHECK(cudaMemset(buf_, 0x5a, size_t(bytes)));
  DS_CUDA_CHECK(cudaMalloc(&count_, sizeof(unsigned long long)));
  DS_CUDA_CHECK(cudaMalloc(&sink_, sizeof(uint32_t)));
  void* h = nullptr;
  DS_CUDA_CHECK(cudaHostAlloc(&h, sizeof(int), cudaHostAllocDefault));
  one_ = static_cast<int*>(h);
  *one_ = 1;
  DS_CUDA_CHECK(cudaMalloc(&flag_dev_, sizeof(int)));
  DS_CUDA_CHECK(cudaStreamCreateWithFlags(&s_, cudaStreamNonBlocking));
  DS_CUDA_CHECK(cudaStreamCreateWithFlags(&ctl_, cudaStreamNonBlocking));
  DS_CUDA_CHECK(cudaEventCreate(&e0_));
  DS_CUDA_CHECK(cudaEventCreate(&e1_));
  smem_ = hog_smem();
  DS_CUDA_CHECK(cudaFuncSetAttribute(k_read_hog, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_));
  DS_CUDA_CHECK(cudaDeviceSynchronize());
}

ReadHog::~ReadHog() {
  if (running_) {  // stop() without its checks (a destructor must not throw)
    cudaMemcpyAsync(flag_dev_, one_, sizeof(int), cudaMemcpyHostToDevice, ctl_);
    cudaEventSynchronize(e1_);
  }
  cudaEventDestroy(e0_);
  cudaEventDestroy(e1_);
  cudaStreamDestroy(s_);
  cudaStreamDestroy(ctl_);
  cudaFreeHost(one_);
  cudaFree(flag_dev_);
  cudaFree(sink_);
  cudaFree(count_);
  cudaFree(buf_);
}

void ReadHog::start() {
  DS_CHECK(!running_, "ReadHog: already running");
  DS_CUDA_CHECK(cudaMemsetAsync(flag_dev_, 0, sizeof(int), s_));
  DS_CUDA_CHECK(cudaMemsetAsync(count_, 0, sizeof(unsigned long long), s_));
  DS_CUDA_CHECK(cudaEventRecord(e0_, s_));
  k_read_hog<<<n_, kHogThreads, size_t(smem_), s_>>>(static_cast<const uint4*>(buf_), bytes_ / 16, flag_dev_, count_,
                                                     sink_, 60ull * 1000000000ull, read_);
  DS_CUDA_CHECK(cudaGetLastError());
  DS_CUDA_CHECK(cudaEventRecord(e1_, s_));
  running_ = true;
}

double ReadHog::stop() {
  DS_CHECK(running_, "ReadHog: not running");
  DS_CUDA_CHECK(cudaMemcpyAsync(flag_dev_, one_, sizeof(int), cudaMemcpyHostToDevice, ctl_));
  running_ = false;
  DS_CUDA_CHECK(cudaEventSynchronize(e1_));
  float ms = 0.f;
  DS_CUDA_CHECK(cudaEventElapsedTime(&ms, e0_, e1_));
  unsigned long long bytes = 0;
  DS_CUDA_CHECK(cudaMemcpyAsync(&bytes, count_, sizeof(bytes), cudaMemcpyDeviceToHost, s_));
  DS_CUDA_CHECK(cudaStreamSynchronize(s_));
  return ms > 0.f ? double(bytes) / (double(ms) * 1e-3) : 0.0;
}

void read_stream(const void* p, int64_t bytes, uint32_t* sink, int blocks, cudaStream_t s) {
  if (blocks <= 0) blocks = 8 * device_sm_count();
  k_read_stream<<<blocks, 256, 0, s>>>(static_cast<const uint4*>(p), bytes / 16, sink);
  DS_CUDA_CHECK(cudaGetLastError());
}

}  // namespace ds::cuda
