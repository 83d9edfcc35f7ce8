// specmoe/core/matrix_view.hpp: a non-owning row-major 2-D view over caller memory.
#pragma once

#include <specmoe/config.hpp>

#include <cstddef>
#include <cstdint>
#include <span>
#include <type_traits>

namespace specmoe {

/// @brief Row-major view of `rows x cols` elements with a row stride (elements, >= cols).
///
/// The library never owns what a view points at: the caller's buffers stay the caller's.
/// A `matrix_view<T const>` converts implicitly from `matrix_view<T>`. Trivially copyable, so
/// the same type is passed to kernels (on the device it is a view of device memory).
/// (std::mdspan would do, but g++ 12, the CI compiler, does not ship it.)
template <class T>
struct matrix_view {
  using element_type = T;

  T* data = nullptr;
  std::int64_t rows = 0;
  std::int64_t cols = 0;
  std::int64_t stride = 0;  ///< elements between the starts of consecutive rows

  constexpr matrix_view() = default;
  constexpr matrix_view(T* d, std::int64_t r, std::int64_t c) noexcept : data(d), rows(r), cols(c), stride(c) {}
  constexpr matrix_view(T* d, std::int64_t r, std::int64_t c, std::int64_t s) noexcept
      : data(d), rows(r), cols(c), stride(s) {}

  /// A view of `U` converts to a view of `U const` (and other qualification-only changes).
  template <class U>
    requires std::is_convertible_v<U (*)[], T (*)[]>
  constexpr matrix_view(matrix_view<U> other) noexcept
      : data(other.data), rows(other.rows), cols(other.cols), stride(other.stride) {}

  SPECMOE_HOST_DEVICE constexpr T* row_ptr(std::int64_t r) const noexcept { return data + r * stride; }
  SPECMOE_HOST_DEVICE constexpr T& operator()(std::int64_t r, std::int64_t c) const noexcept {
    return data[r * stride + c];
  }
  constexpr std::span<T> row(std::int64_t r) const noexcept {
    return {row_ptr(r), static_cast<std::size_t>(cols)};
  }
  [[nodiscard]] constexpr bool empty() const noexcept { return rows == 0 || cols == 0; }
  /// Rows [first, first + count) as a view of their own.
  constexpr matrix_view slice_rows(std::int64_t first, std::int64_t count) const noexcept {
    return {data + first * stride, count, cols, stride};
  }
};

/// @brief Views `rows x cols` dense row-major elements of a span (no copy).
template <class T>
constexpr matrix_view<T> as_matrix(std::span<T> s, std::int64_t rows, std::int64_t cols) noexcept {
  return {s.data(), rows, cols, cols};
}

static_assert(std::is_trivially_copyable_v<matrix_view<float>>);

}  // namespace specmoe
