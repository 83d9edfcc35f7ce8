// specmoe/trace/npy.hpp: NumPy .npy arrays (format 1.0; 2.0 read too), int32 and float32,
// little-endian, C order: the array files of a routing trace (../shared/TRACES.md).
//
// Readers check the magic, version, header, dtype, memory order and the byte count against the
// shape; every error is specmoe::error{errc::io} naming the file and what is wrong.
#pragma once

#include <specmoe/core/error.hpp>

#include <bit>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

namespace specmoe::trace {

/// An array read from a .npy file: its shape and its elements in C order.
template <class T>
struct npy_array {
  std::vector<std::int64_t> shape;
  std::vector<T> data;
};

namespace npy_detail {

static_assert(std::endian::native == std::endian::little, "specmoe's .npy reader and writer assume a little-endian host");

template <class T>
constexpr std::string_view descr() {
  static_assert(std::is_same_v<T, std::int32_t> || std::is_same_v<T, float>, ".npy arrays of int32 or float32 only");
  return std::is_same_v<T, std::int32_t> ? "<i4" : "<f4";
}

/// The value text of `'key':` in a header dict, up to the next top-level comma or the closing brace.
inline std::string_view dict_value(std::string_view header, std::string_view key, std::string const& file) {
  std::string const quoted = std::string("'") + std::string(key) + "'";
  auto const k = header.find(quoted);
  SPECMOE_EXPECTS(k != std::string_view::npos, errc::io, file, ": .npy header has no ", quoted, " entry");
  auto pos = header.find(':', k + quoted.size());
  SPECMOE_EXPECTS(pos != std::string_view::npos, errc::io, file, ": .npy header entry ", quoted, " has no value");
  ++pos;
  while (pos < header.size() && header[pos] == ' ') ++pos;
  std::size_t end = pos;
  int paren = 0;
  while (end < header.size()) {
    char const c = header[end];
    if (c == '(') ++paren;
    if (c == ')') --paren;
    if (paren == 0 && (c == ',' || c == '}')) break;
    ++end;
  }
  while (end > pos && header[end - 1] == ' ') --end;
  return header.substr(pos, end - pos);  // a tuple's own commas were skipped by the paren count
}

inline std::vector<std::int64_t> parse_shape(std::string_view text, std::string const& file) {
  SPECMOE_EXPECTS(text.size() >= 2 && text.front() == '(' && text.back() == ')', errc::io, file, ": .npy shape '", text,
                  "' is not a tuple");
  std::vector<std::int64_t> shape;
  std::string_view inner = text.substr(1, text.size() - 2);
  while (!inner.empty()) {
    while (!inner.empty() && (inner.front() == ' ' || inner.front() == ',')) inner.remove_prefix(1);
    if (inner.empty()) break;
    std::int64_t v = 0;
    std::size_t used = 0;
    while (used < inner.size() && inner[used] >= '0' && inner[used] <= '9') {
      SPECMOE_EXPECTS(v < (std::int64_t{1} << 55), errc::io, file, ": .npy shape '", text, "' is too large");
      v = v * 10 + (inner[used] - '0');
      ++used;
    }
    SPECMOE_EXPECTS(used > 0, errc::io, file, ": .npy shape '", text, "' holds something other than sizes");
    shape.push_back(v);
    inner.remove_prefix(used);
  }
  return shape;
}

}  // namespace npy_detail

/// Reads an int32 or float32 .npy file; errors name `file`.
template <class T>
npy_array<T> read_npy(std::filesystem::path const& path) {
  std::string const file = path.string();
  std::ifstream in(path, std::ios::binary);
  SPECMOE_EXPECTS(in.good(), errc::io, file, ": cannot open (missing or unreadable)");
  char magic[8] = {};
  in.read(magic, 8);
  SPECMOE_EXPECTS(in.gcount() == 8 && std::memcmp(magic, "\x93NUMPY", 6) == 0, errc::io, file,
                  ": not a .npy file (bad magic)");
  auto const major = static_cast<unsigned char>(magic[6]);
  SPECMOE_EXPECTS(major == 1 || major == 2, errc::io, file, ": .npy format version ", int(major), ".",
                  int(static_cast<unsigned char>(magic[7])), " is not supported (1.0 or 2.0)");
  std::uint32_t header_len = 0;
  if (major == 1) {
    unsigned char b[2] = {};
    in.read(reinterpret_cast<char*>(b), 2);
    header_len = b[0] | (b[1] << 8);
  } else {
    unsigned char b[4] = {};
    in.read(reinterpret_cast<char*>(b), 4);
    header_len = b[0] | (b[1] << 8) | (b[2] << 16) | (static_cast<std::uint32_t>(b[3]) << 24);
  }
  SPECMOE_EXPECTS(in.good() && header_len > 0 && header_len < (1u << 20), errc::io, file, ": .npy header length ", header_len,
                  " is not plausible");
  std::string header(header_len, '\0');
  in.read(header.data(), header_len);
  SPECMOE_EXPECTS(static_cast<std::uint32_t>(in.gcount()) == header_len, errc::io, file, ": truncated .npy header");
  auto const descr = npy_detail::dict_value(header, "descr", file);
  std::string const want = std::string("'") + std::string(npy_detail::descr<T>()) + "'";
  SPECMOE_EXPECTS(descr == want, errc::io, file, ": dtype ", descr, ", expected ", want,
                  std::is_same_v<T, float> ? " (float32, little-endian)" : " (int32, little-endian)");
  auto const order = npy_detail::dict_value(header, "fortran_order", file);
  SPECMOE_EXPECTS(order == "False", errc::io, file, ": arrays must be in C order (fortran_order is ", order, ")");
  npy_array<T> a;
  a.shape = npy_detail::parse_shape(npy_detail::dict_value(header, "shape", file), file);
  std::int64_t count = 1;
  for (auto const d : a.shape) {
    SPECMOE_EXPECTS(d == 0 || count <= (std::int64_t{1} << 40) / d, errc::io, file, ": .npy shape is too large");
    count *= d;
  }
  a.data.resize(static_cast<std::size_t>(count));
  in.read(reinterpret_cast<char*>(a.data.data()), static_cast<std::streamsize>(count * sizeof(T)));
  SPECMOE_EXPECTS(in.gcount() == static_cast<std::streamsize>(count * sizeof(T)), errc::io, file, ": holds ",
                  in.gcount() / static_cast<std::streamsize>(sizeof(T)), " of the ", count, " elements its shape promises (truncated)");
  in.peek();
  SPECMOE_EXPECTS(in.eof(), errc::io, file, ": has bytes after the ", count, " elements its shape promises");
  return a;
}

/// Writes `data` (C order) as a .npy 1.0 file of `shape`; the header is padded to 64 bytes as NumPy does.
template <class T>
void write_npy(std::filesystem::path const& path, std::span<std::int64_t const> shape, std::span<T const> data) {
  std::string const file = path.string();
  std::int64_t count = 1;
  for (auto const d : shape) count *= d;
  SPECMOE_EXPECTS(count == static_cast<std::int64_t>(data.size()), errc::shape_mismatch, file, ": ", data.size(),
                  " elements do not fill the shape (", count, " elements)");
  std::string header = std::string("{'descr': '") + std::string(npy_detail::descr<T>()) + "', 'fortran_order': False, 'shape': (";
  for (std::size_t i = 0; i < shape.size(); ++i) header += std::to_string(shape[i]) + (shape.size() == 1 ? "," : i + 1 < shape.size() ? ", " : "");
  header += "), }";
  std::size_t const unpadded = 10 + header.size() + 1;  // magic(6) version(2) length(2) header '\n'
  header.append((64 - unpadded % 64) % 64, ' ');
  header += '\n';
  SPECMOE_EXPECTS(header.size() < 65536, errc::io, file, ": shape too long for a .npy 1.0 header");
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  SPECMOE_EXPECTS(out.good(), errc::io, file, ": cannot open for writing");
  out.write("\x93NUMPY\x01\x00", 8);
  unsigned char const len[2] = {static_cast<unsigned char>(header.size() & 0xff), static_cast<unsigned char>(header.size() >> 8)};
  out.write(reinterpret_cast<char const*>(len), 2);
  out.write(header.data(), static_cast<std::streamsize>(header.size()));
  out.write(reinterpret_cast<char const*>(data.data()), static_cast<std::streamsize>(data.size() * sizeof(T)));
  SPECMOE_EXPECTS(out.good(), errc::io, file, ": write failed");
}

}  // namespace specmoe::trace
