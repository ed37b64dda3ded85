#include "backend/ops.h"

namespace ds {

std::unique_ptr<Backend> make_backend(const std::string& name) {
  if (name == "cpu") return make_cpu_backend();
  if (name == "cuda") {
#ifdef DS_HAVE_CUDA
    return make_cuda_backend(0);
#else
    fail("--backend cuda: this build has no CUDA backend (nvcc was not found at configure time)");
#endif
  }
  fail("--backend: expected cpu or cuda, got '", name, "'");
}

}  // namespace ds
