// Per-kernel device times of a stretch of work, from CUPTI's concurrent-kernel activity records (kernel_times.cpp):
// every kernel that ran between kernel_times_start() and kernel_times_stop(), kernels inside replayed CUDA graphs
// included, each with its own start and end on the device. For `bench --kernel-times` (the GPU image has no nsys,
// ncu serialises and flushes caches between kernels, and the bench's event breakdown inflates short steps).
// One collection at a time per process; the concurrent-kernel kind does not serialise kernels.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

namespace ds::cuda {

struct KernelTime {
  std::string name;      // demangled, namespaces and parameter list removed (short_kernel_name)
  int64_t launches = 0;  // records seen
  double total_ns = 0;   // Σ (end − start)
  double own_ns = 0;     // Σ of the part of each interval no kernel that started earlier covers (kernel_times_stop)
};

// Starts collecting. False (with the reason in *why_not) where CUPTI is not built in or refuses (no device).
bool kernel_times_start(std::string* why_not);
// Drops what was collected so far (after a warm-up that was meant to run under collection), keeps collecting.
void kernel_times_reset();
// Stops collecting (after the caller synchronised the device) and returns the kernels, longest own time first.
// *span_ns (optional): first kernel start to last kernel end of what was kept. skip (optional): kernels whose mangled
// name contains it are left out, own times and span included (the bench's read hog, probe.h ReadHog, which starts
// before and covers every kernel of the steps it runs beside).
std::vector<KernelTime> kernel_times_stop(double* span_ns = nullptr, const char* skip = nullptr);

// "_ZN2ds4cuda12_GLOBAL__N_19k_rmsnormEPKvifflPvi" → "k_rmsnorm"; template arguments stay ("k_int4_mma<2, 2, 2, 2,
// false, 2>"); names that do not demangle are returned as given.
std::string short_kernel_name(const std::string& mangled);

}  // namespace ds::cuda
