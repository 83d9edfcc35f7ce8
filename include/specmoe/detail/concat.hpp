// Builds error messages from mixed arguments without <format> (g++ 12 has none).
#pragma once

#include <sstream>
#include <string>

namespace specmoe::detail {

template <class... Args>
std::string concat(Args const&... args) {
  std::ostringstream os;
  (os << ... << args);
  return os.str();
}

}  // namespace specmoe::detail
