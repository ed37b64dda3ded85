#include "backend/ops.h"

#include "backend/cpu/cpu_backend.h"

namespace ds {

// Backends without a sampling kernel: the CPU specification on a host copy of the logits.
void Backend::sample_rows(const Tensor& logits, int64_t vocab_limit, const std::vector<SampleRowParams>& rows,
                          const std::vector<SampleEdit>& edits, std::vector<int32_t>& ids) {
  DS_CHECK(logits.shape.size() == 2 && logits.dim(0) >= int64_t(rows.size()), "sample_rows: logits [R, V] for ",
           rows.size(), " rows");
  const std::vector<float> host = to_host_f32(logits);
  cpu::sample_rows(host.data(), logits.dim(1), vocab_limit, rows, edits, ids);
}

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
