// Programmatic dependent launch (sm_90+): a kernel launched with pdl_launch() may start while the kernel before it
// on the stream is still finishing; it must call pdl_wait() before it reads anything that kernel wrote or writes
// anything at all. pdl_wait() returns once the previous kernel has completed and its writes are visible, so a
// PDL-launched kernel is as ordered as a plain one; what it gains is its launch and block start-up (and, before
// the wait, work that needs no earlier result) overlapping the previous kernel's tail. pdl_trigger() in the
// previous kernel lets the next one be scheduled before the previous kernel's blocks exit. Both are no-ops where
// unsupported (below sm_90, or a kernel launched without the attribute). Recorded CUDA graphs keep the edges.
//
// Reading before the wait what was written two or more kernels back: B starts once every block of its predecessor A
// has triggered or exited. If A's blocks trigger only after their own pdl_wait() (and at least one of them waits),
// A's predecessor — and, the same way, everything before it — has completed and its writes are visible when B starts.
// The expert down projection's tile table (int4_mma TokenSrc::early), the shared expert's down projection
// (bf16_mma x_early) and the DeltaNet conv kernel's in_proj_ba sums (gdr_decode) rely on it. k_gdn_recur_norm
// triggers at entry, so the kernel after it may not.
//
// The batch table (the device mirror of a BatchMeta) is uploaded by a copy ahead of the step's first kernel, which
// every kernel of the step starts after, and no kernel writes it: any kernel may read it before its wait (the DeltaNet
// kernels, k_attn_dec_tc, k_attn_merge_sm, k_norm_rope; for the last three meta_early() says whether they do).
#pragma once

#include <cuda_runtime.h>

#include <cstdlib>
#include <utility>

namespace ds::cuda {

__device__ __forceinline__ void pdl_wait() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_trigger() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" :::);
#endif
}

// Whether launches on this device use the attribute: compute capability 9.0+ and DS_CUDA_NO_PDL unset.
bool pdl_enabled();
// Whether k_attn_dec_tc, k_attn_merge_sm and k_norm_rope read the batch table before their wait: DS_META_EARLY unset
// or non-"0" (0: after it, as before session 21; the same values).
bool meta_early();

template <typename... KArgs, typename... Args>
cudaError_t pdl_launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem, cudaStream_t s, Args&&... args) {
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = grid;
  cfg.blockDim = block;
  cfg.dynamicSmemBytes = smem;
  cfg.stream = s;
  cudaLaunchAttribute at[1];
  at[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  at[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = at;
  cfg.numAttrs = pdl_enabled() ? 1 : 0;
  return cudaLaunchKernelEx(&cfg, kernel, std::forward<Args>(args)...);
}

}  // namespace ds::cuda
