// `deltaserve bench` (src/cli/cmd_bench.cpp) as a binary that links only the engine, for GPU machines that lack
// the server's libraries: `bench_model bench --random-weights --config ...` takes the same flags.
#include "../../src/cli/cmd_bench.cpp"

#include <cstdio>

int main(int argc, char** argv) {
  try {
    return ds::cli::cmd_bench(argc, argv);
  } catch (const std::exception& e) {
    std::fprintf(stderr, "bench: error: %s\n", e.what());
    return 1;
  }
}
