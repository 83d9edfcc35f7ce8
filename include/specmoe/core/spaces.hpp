// specmoe/core/spaces.hpp: where a layer runs.
#pragma once

#include <type_traits>

namespace specmoe {

/// @brief The plain C++ reference: runs D simulated ranks in one process, fp32 arithmetic.
///
/// What CI tests end to end, the reference every GPU result is compared against, and a simulator
/// for planning more ranks than one machine has.
struct host_space {
  using space_type = host_space;
  static constexpr char const* name = "host";
};

/// @brief One CUDA device per rank: the product. Available when `SPECMOE_HAS_CUDA` is 1.
struct cuda_space {
  using space_type = cuda_space;
  static constexpr char const* name = "cuda";
};

/// @brief Satisfied by the space tags above (and by user spaces that name themselves).
template <class S>
concept execution_space = std::is_same_v<typename S::space_type, S>;

namespace detail {
/// For `static_assert(always_false<T>, "...")` in primary templates that must not be used.
template <class...>
inline constexpr bool always_false = false;
}  // namespace detail

}  // namespace specmoe
