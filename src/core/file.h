// Whole-file reading shared by the loaders (config, tokenizer, chat template, draft vocabulary, ...).
#pragma once
#include <string>

namespace ds {

// The bytes of the file at `path`. `what` names the expected content for the error, e.g. "tokenizer.json":
// an unreadable file fails with "expected a readable <what> at '<path>', got: cannot open the file".
std::string read_file(const std::string& path, const char* what);

}  // namespace ds
