// specmoe/core/error.hpp: the one error type of the library, and the macros that raise it.
#pragma once

#include <specmoe/detail/concat.hpp>

#include <cstdio>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <string_view>

namespace specmoe {

/// @brief What went wrong, as a value a caller can branch on.
///
/// Every error the library raises carries one of these codes and a message that names the
/// offending value, the place in the library that detected it (file:line) and, where it applies,
/// the rank or token involved.
enum class errc {
  invalid_argument,     ///< a value outside its documented domain (negative size, top-k of 0, ...)
  shape_mismatch,       ///< two extents that must agree do not (rows of x vs tokens, hidden sizes)
  expert_out_of_range,  ///< an expert id outside [0, num_experts), or duplicated within a token
  non_finite,           ///< NaN or Inf in activations, logits or routing weights
  rank_mismatch,        ///< ranks disagree on configuration or expert placement
  unowned_expert,       ///< an expert placement leaves an expert without an owner rank
  unsupported,          ///< a combination the library does not implement (named in the message)
  cuda,                 ///< a CUDA runtime or driver call failed
  comm,                 ///< a communication call (NCCL or the in-process exchange) failed
  timeout,              ///< a bounded wait on a peer expired
  io,                   ///< a file could not be read or written, or its format is malformed (trace, plan)
  internal,             ///< an invariant of the library itself broke: please report it
};

/// @brief A short, stable name of an error code (used in messages and logs).
constexpr std::string_view to_string(errc code) noexcept {
  switch (code) {
    case errc::invalid_argument: return "invalid_argument";
    case errc::shape_mismatch: return "shape_mismatch";
    case errc::expert_out_of_range: return "expert_out_of_range";
    case errc::non_finite: return "non_finite";
    case errc::rank_mismatch: return "rank_mismatch";
    case errc::unowned_expert: return "unowned_expert";
    case errc::unsupported: return "unsupported";
    case errc::cuda: return "cuda";
    case errc::comm: return "comm";
    case errc::timeout: return "timeout";
    case errc::io: return "io";
    case errc::internal: return "internal";
  }
  return "unknown";
}

/// @brief The exception every specmoe function throws.
///
/// `what()` reads `specmoe: <code>: <message> (<file>:<line>)`. Functions that throw leave the
/// caller's output buffers untouched: inputs are validated before the first write.
class error : public std::runtime_error {
 public:
  error(errc code, std::string const& message)
      : std::runtime_error(detail::concat("specmoe: ", to_string(code), ": ", message)), code_(code) {}

  /// The code that classifies this error.
  [[nodiscard]] errc code() const noexcept { return code_; }

 private:
  errc code_;
};

namespace detail {
[[noreturn]] inline void throw_error(errc code, std::string const& message, char const* file, int line) {
  throw error(code, concat(message, " (", file, ":", line, ")"));
}
}  // namespace detail

}  // namespace specmoe

/// @brief Always-on precondition check: throws `specmoe::error{code, message}` when `cond` is false.
///
/// The message arguments are streamed (`SPECMOE_EXPECTS(k <= e, errc::invalid_argument,
/// "top_k ", k, " exceeds num_experts ", e)`) and evaluated only on failure.
#define SPECMOE_EXPECTS(cond, code, ...)                                                                 \
  do {                                                                                                   \
    if (!(cond)) [[unlikely]] {                                                                          \
      ::specmoe::detail::throw_error((code), ::specmoe::detail::concat(__VA_ARGS__), __FILE__, __LINE__); \
    }                                                                                                    \
  } while (0)

/// @brief Raises `specmoe::error{code, message}` unconditionally.
#define SPECMOE_FAIL(code, ...) \
  ::specmoe::detail::throw_error((code), ::specmoe::detail::concat(__VA_ARGS__), __FILE__, __LINE__)

/// @brief Internal invariant check, usable in host and device code. Prints the expression and
/// file:line, then aborts (host) or traps (device). Off under NDEBUG unless
/// SPECMOE_ENFORCE_CONTRACTS is defined.
#if !defined(NDEBUG) || defined(SPECMOE_ENFORCE_CONTRACTS)
#if defined(__CUDA_ARCH__)
#define SPECMOE_ASSERT(cond)                                                              \
  do {                                                                                    \
    if (!(cond)) {                                                                        \
      printf("specmoe: assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__);       \
      __trap();                                                                           \
    }                                                                                     \
  } while (0)
#else
#define SPECMOE_ASSERT(cond)                                                                   \
  do {                                                                                         \
    if (!(cond)) {                                                                             \
      std::fprintf(stderr, "specmoe: assertion failed: %s (%s:%d)\n", #cond, __FILE__, __LINE__); \
      std::abort();                                                                            \
    }                                                                                          \
  } while (0)
#endif
#else
#define SPECMOE_ASSERT(cond) ((void)0)
#endif
