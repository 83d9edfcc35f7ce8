// specmoe/detail/json.hpp: the small JSON reader and writer behind trace metadata and plan files.
//
// Values keep object keys in insertion order (files read back as written) and integers exactly
// (int64) beside doubles. Parse errors are specmoe::error{errc::invalid_argument} naming the line
// and column. Not a general-purpose library: no comments, no \u escapes beyond the BMP.
#pragma once

#include <specmoe/core/error.hpp>

#include <charconv>
#include <filesystem>
#include <fstream>
#include <sstream>
#include <cmath>
#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <utility>
#include <variant>
#include <vector>

namespace specmoe::detail::json {

class value;
using array = std::vector<value>;
/// Ordered object: (key, value) pairs as read or inserted.
using object = std::vector<std::pair<std::string, value>>;

class value {
 public:
  value() = default;                                   // null
  value(std::nullptr_t) {}                             // null
  value(bool b) : v_(b) {}                             // NOLINT(google-explicit-constructor)
  value(std::int64_t i) : v_(i) {}                     // NOLINT
  value(int i) : v_(static_cast<std::int64_t>(i)) {}   // NOLINT
  value(double d) : v_(d) {}                           // NOLINT
  value(std::string s) : v_(std::move(s)) {}          // NOLINT
  value(char const* s) : v_(std::string(s)) {}         // NOLINT
  value(array a) : v_(std::make_shared<array>(std::move(a))) {}    // NOLINT
  value(object o) : v_(std::make_shared<object>(std::move(o))) {}  // NOLINT

  [[nodiscard]] bool is_null() const noexcept { return v_.index() == 0; }
  [[nodiscard]] bool is_bool() const noexcept { return std::holds_alternative<bool>(v_); }
  [[nodiscard]] bool is_int() const noexcept { return std::holds_alternative<std::int64_t>(v_); }
  [[nodiscard]] bool is_number() const noexcept { return is_int() || std::holds_alternative<double>(v_); }
  [[nodiscard]] bool is_string() const noexcept { return std::holds_alternative<std::string>(v_); }
  [[nodiscard]] bool is_array() const noexcept { return std::holds_alternative<std::shared_ptr<array>>(v_); }
  [[nodiscard]] bool is_object() const noexcept { return std::holds_alternative<std::shared_ptr<object>>(v_); }

  /// Typed access; `what` names the value in the error (e.g. "meta.json: layers").
  [[nodiscard]] bool as_bool(std::string_view what) const {
    expect(is_bool(), what, "a boolean");
    return std::get<bool>(v_);
  }
  [[nodiscard]] std::int64_t as_int(std::string_view what) const {
    if (auto const* d = std::get_if<double>(&v_); d && std::floor(*d) == *d && std::fabs(*d) < 9.0e15) {
      return static_cast<std::int64_t>(*d);
    }
    expect(is_int(), what, "an integer");
    return std::get<std::int64_t>(v_);
  }
  [[nodiscard]] double as_double(std::string_view what) const {
    expect(is_number(), what, "a number");
    return is_int() ? static_cast<double>(std::get<std::int64_t>(v_)) : std::get<double>(v_);
  }
  [[nodiscard]] std::string const& as_string(std::string_view what) const {
    expect(is_string(), what, "a string");
    return std::get<std::string>(v_);
  }
  [[nodiscard]] array const& as_array(std::string_view what) const {
    expect(is_array(), what, "an array");
    return *std::get<std::shared_ptr<array>>(v_);
  }
  [[nodiscard]] object const& as_object(std::string_view what) const {
    expect(is_object(), what, "an object");
    return *std::get<std::shared_ptr<object>>(v_);
  }

  /// The member `key` of an object, or null when absent (or when this is not an object).
  [[nodiscard]] value const* find(std::string_view key) const {
    if (!is_object()) return nullptr;
    for (auto const& [k, v] : *std::get<std::shared_ptr<object>>(v_)) {
      if (k == key) return &v;
    }
    return nullptr;
  }
  /// The member `key`; an error naming `what` and the key when absent.
  [[nodiscard]] value const& at(std::string_view key, std::string_view what) const {
    auto const* v = find(key);
    SPECMOE_EXPECTS(v != nullptr, errc::invalid_argument, what, ": missing \"", key, "\"");
    return *v;
  }

  /// Compact JSON text (objects one member a line at the top level when `pretty`).
  [[nodiscard]] std::string dump(bool pretty = false) const {
    std::string out;
    write(out, pretty, 0);
    return out;
  }

 private:
  void expect(bool ok, std::string_view what, char const* kind) const {
    SPECMOE_EXPECTS(ok, errc::invalid_argument, what, " must be ", kind);
  }

  static void write_string(std::string& out, std::string const& s) {
    out += '"';
    for (char const c : s) {
      switch (c) {
        case '"': out += "\\\""; break;
        case '\\': out += "\\\\"; break;
        case '\n': out += "\\n"; break;
        case '\t': out += "\\t"; break;
        case '\r': out += "\\r"; break;
        default:
          if (static_cast<unsigned char>(c) < 0x20) {
            char buf[8];
            auto const n = static_cast<unsigned>(static_cast<unsigned char>(c));
            buf[0] = '\\', buf[1] = 'u', buf[2] = '0', buf[3] = '0';
            buf[4] = "0123456789abcdef"[n >> 4], buf[5] = "0123456789abcdef"[n & 15], buf[6] = 0;
            out += buf;
          } else {
            out += c;
          }
      }
    }
    out += '"';
  }

  void write(std::string& out, bool pretty, int depth) const {
    switch (v_.index()) {
      case 0: out += "null"; return;
      case 1: out += std::get<bool>(v_) ? "true" : "false"; return;
      case 2: out += std::to_string(std::get<std::int64_t>(v_)); return;
      case 3: {
        double const d = std::get<double>(v_);
        SPECMOE_EXPECTS(std::isfinite(d), errc::invalid_argument, "JSON cannot hold a non-finite number");
        char buf[32];
        auto const r = std::to_chars(buf, buf + sizeof buf, d);  // shortest text that reads back exactly
        out.append(buf, r.ptr);
        return;
      }
      case 4: write_string(out, std::get<std::string>(v_)); return;
      case 5: {
        auto const& a = *std::get<std::shared_ptr<array>>(v_);
        out += '[';
        for (std::size_t i = 0; i < a.size(); ++i) {
          if (i) out += ", ";
          a[i].write(out, false, depth + 1);
        }
        out += ']';
        return;
      }
      default: {
        auto const& o = *std::get<std::shared_ptr<object>>(v_);
        bool const lines = pretty && depth == 0;
        out += '{';
        for (std::size_t i = 0; i < o.size(); ++i) {
          if (i) out += ',';
          if (lines) out += "\n  "; else if (i) out += ' ';
          write_string(out, o[i].first);
          out += ": ";
          o[i].second.write(out, pretty, depth + 1);
        }
        if (lines && !o.empty()) out += '\n';
        out += '}';
      }
    }
  }

  std::variant<std::monostate, bool, std::int64_t, double, std::string, std::shared_ptr<array>, std::shared_ptr<object>> v_;
};

namespace parse_detail {

struct parser {
  std::string_view text;
  std::string_view source;  // names the document in errors
  std::size_t pos = 0;
  int depth = 0;

  [[noreturn]] void fail(std::string_view what) const {
    std::size_t line = 1, col = 1;
    for (std::size_t i = 0; i < pos && i < text.size(); ++i) {
      if (text[i] == '\n') {
        ++line;
        col = 1;
      } else {
        ++col;
      }
    }
    SPECMOE_FAIL(errc::invalid_argument, source, ": invalid JSON at line ", line, ", column ", col, ": ", what);
  }
  void skip_ws() {
    while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\n' || text[pos] == '\t' || text[pos] == '\r')) ++pos;
  }
  bool eat(char c) {
    skip_ws();
    if (pos < text.size() && text[pos] == c) {
      ++pos;
      return true;
    }
    return false;
  }
  void need(char c) {
    if (!eat(c)) fail(std::string("expected '") + c + "'");
  }
  bool literal(std::string_view word) {
    if (text.substr(pos, word.size()) == word) {
      pos += word.size();
      return true;
    }
    return false;
  }

  std::string parse_string() {
    need('"');
    std::string s;
    while (true) {
      if (pos >= text.size()) fail("unterminated string");
      char const c = text[pos++];
      if (c == '"') return s;
      if (static_cast<unsigned char>(c) < 0x20) fail("control character in a string");
      if (c != '\\') {
        s += c;
        continue;
      }
      if (pos >= text.size()) fail("unterminated escape");
      char const e = text[pos++];
      switch (e) {
        case '"': s += '"'; break;
        case '\\': s += '\\'; break;
        case '/': s += '/'; break;
        case 'b': s += '\b'; break;
        case 'f': s += '\f'; break;
        case 'n': s += '\n'; break;
        case 'r': s += '\r'; break;
        case 't': s += '\t'; break;
        case 'u': {
          if (pos + 4 > text.size()) fail("short \\u escape");
          unsigned cp = 0;
          auto const r = std::from_chars(text.data() + pos, text.data() + pos + 4, cp, 16);
          if (r.ec != std::errc{} || r.ptr != text.data() + pos + 4) fail("bad \\u escape");
          pos += 4;
          if (cp < 0x80) {
            s += static_cast<char>(cp);
          } else if (cp < 0x800) {
            s += static_cast<char>(0xC0 | (cp >> 6));
            s += static_cast<char>(0x80 | (cp & 0x3F));
          } else {
            s += static_cast<char>(0xE0 | (cp >> 12));
            s += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
            s += static_cast<char>(0x80 | (cp & 0x3F));
          }
          break;
        }
        default: fail("unknown escape");
      }
    }
  }

  value parse_number() {
    std::size_t const start = pos;
    if (pos < text.size() && text[pos] == '-') ++pos;
    bool integral = true;
    while (pos < text.size()) {
      char const c = text[pos];
      if (c >= '0' && c <= '9') {
        ++pos;
      } else if (c == '.' || c == 'e' || c == 'E' || c == '+' || c == '-') {
        integral = false;
        ++pos;
      } else {
        break;
      }
    }
    auto const* b = text.data() + start;
    auto const* e = text.data() + pos;
    if (b == e) fail("expected a value");
    if (integral) {
      std::int64_t i = 0;
      auto const r = std::from_chars(b, e, i);
      if (r.ec == std::errc{} && r.ptr == e) return value(i);
    }
    double d = 0;
    auto const r = std::from_chars(b, e, d);
    if (r.ec != std::errc{} || r.ptr != e) {
      pos = start;
      fail("bad number");
    }
    return value(d);
  }

  value parse_value() {
    if (++depth > 64) fail("nested deeper than 64 levels");
    skip_ws();
    if (pos >= text.size()) fail("unexpected end");
    value v;
    char const c = text[pos];
    if (c == '{') {
      ++pos;
      object o;
      if (!eat('}')) {
        do {
          skip_ws();
          std::string key = parse_string();
          need(':');
          o.emplace_back(std::move(key), parse_value());
        } while (eat(','));
        need('}');
      }
      v = value(std::move(o));
    } else if (c == '[') {
      ++pos;
      array a;
      if (!eat(']')) {
        do {
          a.push_back(parse_value());
        } while (eat(','));
        need(']');
      }
      v = value(std::move(a));
    } else if (c == '"') {
      v = value(parse_string());
    } else if (literal("true")) {
      v = value(true);
    } else if (literal("false")) {
      v = value(false);
    } else if (literal("null")) {
      v = value();
    } else {
      v = parse_number();
    }
    --depth;
    return v;
  }
};

}  // namespace parse_detail

/// Parses one JSON document; `source` names it in errors (e.g. the file path).
inline value parse(std::string_view text, std::string_view source = "JSON") {
  parse_detail::parser p{text, source};
  value v = p.parse_value();
  p.skip_ws();
  if (p.pos != text.size()) p.fail("unexpected text after the value");
  return v;
}

/// Reads and parses a JSON file, checks its "format" is `format`, and returns the document.
/// @throw specmoe::error io (unreadable, wrong format) or invalid_argument (bad JSON), naming the file.
inline value read_file(std::filesystem::path const& path, std::string_view format) {
  std::string const file = path.string();
  std::ifstream in(path, std::ios::binary);
  SPECMOE_EXPECTS(in.good(), errc::io, file, ": cannot open (missing or unreadable)");
  std::ostringstream text;
  text << in.rdbuf();
  auto doc = parse(text.str(), file);
  auto const& got = doc.at("format", file).as_string(file + ": format");
  SPECMOE_EXPECTS(got == format, errc::io, file, ": format \"", got, "\" is not \"", format, "\"");
  return doc;
}

/// Writes `doc` pretty-printed to `path`.
/// @throw specmoe::error io naming the file when it cannot be written.
inline void write_file(std::filesystem::path const& path, value const& doc) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  SPECMOE_EXPECTS(out.good(), errc::io, path.string(), ": cannot open for writing");
  out << doc.dump(true) << '\n';
  SPECMOE_EXPECTS(out.good(), errc::io, path.string(), ": write failed");
}

}  // namespace specmoe::detail::json
