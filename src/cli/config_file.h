// vLLM's `--config FILE.yaml`: a flat YAML mapping of flag names to values, read as if they were given on the command
// line after its own flags (so the command line wins for single-valued flags).
#pragma once
#include <string>
#include <vector>

namespace ds::cli {

// The file's flags as command-line words: `port: 8000` -> "--port", "8000"; `enforce-eager: true` -> "--enforce-eager"
// (false: left out); a block list (`key:` then `- value` lines) or several values repeat the flag. Keys may use '_' or
// '-'. Values: plain scalars, '...' / "..." quoted strings, and JSON written inline (`{"method": "mtp", ...}`,
// `["*"]`), passed through as text for the flag to parse. Throws ds::Error naming the file, the line and what was
// expected for anything else (nested mappings, anchors, multi-line strings).
std::vector<std::string> config_file_args(const std::string& path);

// `--config FILE` taken out of the arguments and the file's flags appended after the rest (argv[first..]).
std::vector<std::string> expand_config_args(int argc, char** argv, int first);

}  // namespace ds::cli
