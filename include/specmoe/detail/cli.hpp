// specmoe/detail/cli.hpp: the command-line flags of the specmoe tools (specmoe-plan, specmoe-sim,
// specmoe-trace-gen): `--name value` pairs and bare `--switch`es; a bad or unknown flag prints
// the problem and the usage, and exits with status 2.
#pragma once

#include <cstdio>
#include <cstdlib>
#include <map>
#include <set>
#include <string>
#include <string_view>
#include <vector>

namespace specmoe::detail::cli {

class args {
 public:
  /// `switches`: flags that take no value.
  args(int argc, char** argv, std::string tool, std::string usage, std::set<std::string> switches = {})
      : tool_(std::move(tool)), usage_(std::move(usage)) {
    for (int i = 1; i < argc; ++i) {
      std::string const a = argv[i];
      if (a == "--help" || a == "-h") {
        std::printf("usage: %s\n", usage_.c_str());
        std::exit(0);
      }
      if (a.rfind("--", 0) != 0) fail("unexpected argument '" + a + "'");
      if (switches.count(a)) {
        values_[a] = "";
        continue;
      }
      if (i + 1 >= argc) fail(a + " needs a value");
      values_[a] = argv[++i];
    }
  }

  [[nodiscard]] bool has(std::string const& flag) {
    used_.insert(flag);
    return values_.count(flag) != 0;
  }
  [[nodiscard]] std::string text(std::string const& flag, std::string const& fallback) {
    return has(flag) ? values_[flag] : fallback;
  }
  [[nodiscard]] std::string required(std::string const& flag) {
    if (!has(flag)) fail(flag + " is required");
    return values_[flag];
  }
  [[nodiscard]] long long integer(std::string const& flag, long long fallback, long long lo, long long hi) {
    if (!has(flag)) return fallback;
    char* end = nullptr;
    auto const& s = values_[flag];
    long long const v = std::strtoll(s.c_str(), &end, 10);
    if (s.empty() || *end != '\0' || v < lo || v > hi) {
      fail(flag + " wants an integer in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + s + "'");
    }
    return v;
  }
  [[nodiscard]] double real(std::string const& flag, double fallback, double lo, double hi) {
    if (!has(flag)) return fallback;
    char* end = nullptr;
    auto const& s = values_[flag];
    double const v = std::strtod(s.c_str(), &end);
    if (s.empty() || *end != '\0' || !(v >= lo && v <= hi)) {
      fail(flag + " wants a number in [" + std::to_string(lo) + ", " + std::to_string(hi) + "], got '" + s + "'");
    }
    return v;
  }
  [[nodiscard]] std::string choice(std::string const& flag, std::string const& fallback, std::vector<std::string> const& allowed) {
    auto const v = text(flag, fallback);
    for (auto const& a : allowed) {
      if (a == v) return v;
    }
    std::string list;
    for (auto const& a : allowed) list += (list.empty() ? "" : "|") + a;
    fail(flag + " wants one of " + list + ", got '" + v + "'");
  }
  /// Fails on any flag the tool never asked about (a typo, or a flag of another tool).
  void finish() {
    for (auto const& [k, v] : values_) {
      if (!used_.count(k)) fail("unknown flag " + k);
    }
  }
  [[noreturn]] void fail(std::string const& message) const {
    std::fprintf(stderr, "%s: %s\nusage: %s\n", tool_.c_str(), message.c_str(), usage_.c_str());
    std::exit(2);
  }

 private:
  std::string tool_, usage_;
  std::map<std::string, std::string> values_;
  std::set<std::string> used_;
};

}  // namespace specmoe::detail::cli
