// int4_wg.h and flash_attn.h's flash_wg_prefill where the build has no sm_90a target (src/backend/cuda/sm90a/ is
// compiled only when the CUDA architectures include 90): the Hopper kernels are unavailable and the mma.sync kernels
// run.
#include "backend/cuda/flash_attn.h"
#include "backend/cuda/int4_wg.h"

#include "core/status.h"

#ifndef DS_HAVE_SM90A
namespace ds::cuda {
bool int4_wg_enabled() { return false; }
bool int4_wg_linear2(const int4dev::Int4Out&, const int4dev::Int4Out*, const void*, int64_t, cudaStream_t) {
  return false;
}
bool int4_wgx_enabled() { return false; }
bool int4_wgx_fits(const MmaInt4&, const MmaInt4&, int64_t, int64_t, int64_t, int64_t) { return false; }
void int4_wgx_moe(const int4dev::Int4Out&, const int4dev::Int4Out&, const void*, int64_t, const int4dev::TokenSrc&,
                  int64_t, void*, cudaStream_t) {
  DS_CHECK(false, "int4 wgx: not built (no sm_90a target)");
}
bool flash_wg_prefill(const void*, const void*, const void*, void*, int64_t, int, int64_t, int64_t, int64_t, int64_t,
                      const int32_t*, const int32_t*, int, cudaStream_t) {
  return false;
}
}  // namespace ds::cuda
#endif
