#include "core/file.h"

#include <cstdio>
#include <filesystem>

#include "core/status.h"

namespace ds {

std::string read_file(const std::string& path, const char* what) {
  std::error_code ec;
  if (std::filesystem::is_directory(path, ec))
    fail("expected a readable ", what, " at '", path, "', got: a directory");
  std::FILE* f = std::fopen(path.c_str(), "rb");
  if (!f) fail("expected a readable ", what, " at '", path, "', got: cannot open the file");
  std::string s;
  if (std::fseek(f, 0, SEEK_END) == 0) {
    long n = std::ftell(f);
    if (n > 0) s.reserve(size_t(n));
    std::rewind(f);
  }
  char buf[1 << 16];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof buf, f)) > 0) s.append(buf, got);
  bool bad = std::ferror(f) != 0;
  std::fclose(f);
  if (bad) fail("expected a readable ", what, " at '", path, "', got: a read error");
  return s;
}

}  // namespace ds
