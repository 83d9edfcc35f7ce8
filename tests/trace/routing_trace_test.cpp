// Routing traces (trace/routing_trace.hpp, trace/npy.hpp, detail/json.hpp): round trips, the
// byte layout NumPy expects, and every malformed input rejected with an error naming the file.
#include "support/testbed.hpp"

#include <specmoe/detail/json.hpp>
#include <specmoe/trace/routing_trace.hpp>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <limits>
#include <random>
#include <string>
#include <vector>

using namespace specmoe;
namespace fs = std::filesystem;

namespace {

/// A fresh empty directory under the system temp dir, removed at scope exit.
struct temp_dir {
  fs::path path;
  explicit temp_dir(std::string const& name) {
    static std::mt19937_64 rng(std::random_device{}());
    path = fs::temp_directory_path() / ("specmoe_" + name + "_" + std::to_string(rng()));
    fs::create_directories(path);
  }
  ~temp_dir() {
    std::error_code ec;
    fs::remove_all(path, ec);
  }
};

trace::routing_trace random_trace(std::uint64_t seed, int layers, int experts, int top_k, std::int64_t tokens, bool optional) {
  std::mt19937_64 rng(seed);
  trace::routing_trace tr;
  tr.meta = {.model = "unit-test \"quoted\"", .layers = layers, .experts = experts, .top_k = top_k, .tokens = tokens,
             .sequences = {{0, tokens / 2}, {tokens / 2, tokens}}, .source = "routing_trace_test", .draft = std::nullopt};
  std::vector<std::int32_t> all(static_cast<std::size_t>(experts));
  auto fill = [&](std::vector<std::int32_t>& ids, int L, int E, int k) {
    all.resize(static_cast<std::size_t>(E));
    for (int e = 0; e < E; ++e) all[static_cast<std::size_t>(e)] = e;
    for (std::int64_t i = 0; i < L * tokens; ++i) {
      for (int j = 0; j < k; ++j) std::swap(all[static_cast<std::size_t>(j)], all[static_cast<std::size_t>(j + static_cast<int>(rng() % static_cast<std::uint64_t>(E - j)))]);
      ids.insert(ids.end(), all.begin(), all.begin() + k);
    }
  };
  fill(tr.topk_ids, layers, experts, top_k);
  if (optional) {
    std::uniform_real_distribution<float> u(0.01f, 1.0f);
    for (std::size_t i = 0; i < tr.topk_ids.size(); ++i) tr.topk_weights.push_back(u(rng));
    for (std::int64_t t = 0; t < tokens; ++t) tr.token_ids.push_back(static_cast<std::int32_t>(rng() % 32000));
    tr.meta.draft = trace::draft_meta{"draft-model", 2, experts, top_k};
    fill(tr.draft_topk_ids, 2, experts, top_k);
  }
  return tr;
}

void write_bytes(fs::path const& p, std::string const& bytes) {
  std::ofstream out(p, std::ios::binary | std::ios::trunc);
  out << bytes;
}
std::string read_bytes(fs::path const& p) {
  std::ifstream in(p, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

/// `mutate` spoils a valid trace directory; reading it must fail with `code` and a message holding `needle`.
template <class Mutate>
void require_rejected(std::string const& name, Mutate&& mutate, errc code, std::string const& needle) {
  temp_dir dir(name);
  trace::write_trace(dir.path, random_trace(11, 3, 8, 2, 10, true));
  mutate(dir.path);
  INFO("case " << name);
  specmoe::test::require_error([&] { (void)trace::read_trace(dir.path); }, code, needle);
}

}  // namespace

TEST_CASE("json: values round trip through text, errors name line and column", "[trace][json]") {
  namespace js = specmoe::detail::json;
  auto const v = js::parse(R"({"a": 1, "b": [true, false, null, -2.5e3, 9007199254740993], "c": {"d": "x\"\\\n\u00e9"}})", "doc");
  CHECK(v.at("a", "doc").as_int("a") == 1);
  auto const& b = v.at("b", "doc").as_array("b");
  REQUIRE(b.size() == 5);
  CHECK(b[0].as_bool("b0"));
  CHECK(b[2].is_null());
  CHECK(b[3].as_double("b3") == -2500.0);
  CHECK(b[4].as_int("b4") == 9007199254740993);  // exact beyond double's 2^53
  CHECK(v.at("c", "doc").at("d", "c").as_string("d") == "x\"\\\n\xc3\xa9");
  auto const again = js::parse(v.dump(), "again");
  CHECK(again.dump() == v.dump());
  CHECK(js::parse(js::value(0.1).dump()).as_double("x") == 0.1);  // shortest round-trip text
  specmoe::test::require_error([] { (void)js::parse("{\n  \"a\": [1, 2,\n  }", "bad.json"); }, errc::invalid_argument,
                               "bad.json: invalid JSON at line 3, column 3");
  specmoe::test::require_error([] { (void)js::parse("{\"a\": 1} x", "t.json"); }, errc::invalid_argument, "unexpected text");
  specmoe::test::require_error([] { (void)js::parse("\"abc", "t.json"); }, errc::invalid_argument, "unterminated string");
  specmoe::test::require_error([] { (void)js::parse("{\"a\": 1}").at("b", "meta"); }, errc::invalid_argument, "meta: missing \"b\"");
  specmoe::test::require_error([] { (void)js::parse("[1]").as_object("plan"); }, errc::invalid_argument, "plan must be an object");
}

TEST_CASE("trace: write then read gives the same trace, optional arrays included", "[trace]") {
  for (bool optional : {false, true}) {
    temp_dir dir("roundtrip");
    auto const tr = random_trace(optional ? 5 : 6, 4, 64, 8, 300, optional);
    trace::write_trace(dir.path, tr);
    auto const back = trace::read_trace(dir.path);
    CHECK(back.meta.model == tr.meta.model);
    CHECK(back.meta.source == tr.meta.source);
    CHECK(back.meta.layers == 4);
    CHECK(back.meta.experts == 64);
    CHECK(back.meta.top_k == 8);
    CHECK(back.meta.tokens == 300);
    CHECK(back.meta.sequences == tr.meta.sequences);
    CHECK(back.topk_ids == tr.topk_ids);
    CHECK(back.topk_weights == tr.topk_weights);
    CHECK(back.token_ids == tr.token_ids);
    CHECK(back.draft_topk_ids == tr.draft_topk_ids);
    CHECK(back.meta.draft.has_value() == optional);
    CHECK(fs::exists(dir.path / "topk_weights.npy") == optional);
    // Routing view of one layer: the trace's ids, and 1/top_k weights where the trace has none.
    std::vector<float> scratch;
    auto const r = back.layer_routing(2, scratch);
    CHECK(r.num_tokens == 300);
    CHECK(r.id(7, 3) == back.id(2, 7, 3));
    CHECK(r.weight(7, 3) == (optional ? tr.topk_weights[static_cast<std::size_t>((2 * 300 + 7) * 8 + 3)] : 0.125f));
  }
}

TEST_CASE("trace: .npy files carry NumPy's 1.0 header, 64-byte aligned, little-endian C order", "[trace][npy]") {
  temp_dir dir("npy");
  std::vector<std::int64_t> const shape{2, 3};
  std::vector<std::int32_t> const data{1, -2, 3, 4, 5, 2147483647};
  trace::write_npy<std::int32_t>(dir.path / "a.npy", shape, data);
  auto const bytes = read_bytes(dir.path / "a.npy");
  REQUIRE(bytes.size() > 10);
  CHECK(bytes.substr(0, 8) == std::string("\x93NUMPY\x01\x00", 8));
  std::size_t const header_len = static_cast<unsigned char>(bytes[8]) | (static_cast<unsigned char>(bytes[9]) << 8);
  CHECK((10 + header_len) % 64 == 0);
  std::string const header = bytes.substr(10, header_len);
  CHECK(header.find("'descr': '<i4'") != std::string::npos);
  CHECK(header.find("'fortran_order': False") != std::string::npos);
  CHECK(header.find("'shape': (2, 3)") != std::string::npos);
  CHECK(header.back() == '\n');
  CHECK(bytes.size() == 10 + header_len + data.size() * 4);
  CHECK(static_cast<unsigned char>(bytes[10 + header_len + 4]) == 0xfe);  // -2, little-endian
  auto const back = trace::read_npy<std::int32_t>(dir.path / "a.npy");
  CHECK(back.shape == shape);
  CHECK(back.data == data);
  // A one-dimensional shape is written as NumPy writes it: (n,)
  std::vector<std::int64_t> const one{3};
  std::vector<float> const f{0.5f, -1.0f, 3.25f};
  trace::write_npy<float>(dir.path / "f.npy", one, f);
  CHECK(read_bytes(dir.path / "f.npy").find("'shape': (3,)") != std::string::npos);
  CHECK(trace::read_npy<float>(dir.path / "f.npy").data == f);
  // A header written by NumPy itself (hand-made bytes, version 1.0, 16-byte padding) reads.
  std::string h = "{'descr': '<f4', 'fortran_order': False, 'shape': (2,), }";
  h.append(80 - 10 - h.size() - 1, ' ');  // 16-byte alignment, as older NumPy wrote
  h += '\n';
  float const two[2] = {1.5f, -7.0f};
  write_bytes(dir.path / "np.npy", std::string("\x93NUMPY\x01\x00", 8) + std::string(1, static_cast<char>(h.size())) + std::string(1, '\0') +
                                       h + std::string(reinterpret_cast<char const*>(two), 8));
  CHECK(trace::read_npy<float>(dir.path / "np.npy").data == std::vector<float>{1.5f, -7.0f});
}

TEST_CASE("trace: malformed traces are rejected with the file and the problem named", "[trace][errors]") {
  using P = fs::path const&;
  auto const spoil_header = [](P p, std::string const& file, std::string const& from, std::string const& to) {
    auto bytes = read_bytes(p / file);
    auto const at = bytes.find(from);
    REQUIRE(at != std::string::npos);
    bytes.replace(at, from.size(), to);
    write_bytes(p / file, bytes);
  };
  require_rejected("missing_meta", [](P p) { fs::remove(p / "meta.json"); }, errc::io, "meta.json: cannot open");
  require_rejected("bad_json", [](P p) { write_bytes(p / "meta.json", "{\"format\": "); }, errc::invalid_argument,
                   "meta.json: invalid JSON");
  require_rejected("format", [&](P p) { spoil_header(p, "meta.json", "specmoe-trace/1", "specmoe-trace/9"); }, errc::io,
                   "format \"specmoe-trace/9\"");
  require_rejected("no_layers", [&](P p) { spoil_header(p, "meta.json", "\"layers\"", "\"Layers\""); }, errc::invalid_argument,
                   "missing \"layers\"");
  require_rejected("missing_ids", [](P p) { fs::remove(p / "topk_ids.npy"); }, errc::io, "topk_ids.npy: cannot open");
  require_rejected("magic", [&](P p) { spoil_header(p, "topk_ids.npy", "NUMPY", "NUMPZ"); }, errc::io, "topk_ids.npy: not a .npy file");
  require_rejected("dtype", [&](P p) { spoil_header(p, "topk_ids.npy", "'<i4'", "'<i8'"); }, errc::io,
                   "topk_ids.npy: dtype '<i8', expected '<i4'");
  require_rejected("order", [&](P p) { spoil_header(p, "topk_ids.npy", "False", "True "); }, errc::io, "C order");
  require_rejected("shape", [&](P p) { spoil_header(p, "topk_ids.npy", "(3, 10, 2)", "(3, 5, 4) "); }, errc::shape_mismatch,
                   "topk_ids.npy: shape [3, 5, 4] disagrees with meta.json's [3, 10, 2]");
  require_rejected("truncated", [](P p) {
    auto b = read_bytes(p / "topk_ids.npy");
    write_bytes(p / "topk_ids.npy", b.substr(0, b.size() - 6));
  }, errc::io, "topk_ids.npy: holds 58 of the 60 elements");
  require_rejected("trailing", [](P p) { write_bytes(p / "topk_ids.npy", read_bytes(p / "topk_ids.npy") + "xx"); }, errc::io,
                   "has bytes after the 60 elements");
  auto const poke_id = [](P p, std::size_t index, std::int32_t value) {
    auto a = trace::read_npy<std::int32_t>(p / "topk_ids.npy");
    a.data[index] = value;
    trace::write_npy<std::int32_t>(p / "topk_ids.npy", a.shape, a.data);
  };
  // index (layer 1, token 3, slot 1) = (1 * 10 + 3) * 2 + 1 = 27
  require_rejected("out_of_range", [&](P p) { poke_id(p, 27, 8); }, errc::expert_out_of_range,
                   "topk_ids.npy: expert id 8 at layer 1, token 3 is outside [0, 8)");
  require_rejected("negative", [&](P p) { poke_id(p, 27, -1); }, errc::expert_out_of_range, "expert id -1 at layer 1, token 3");
  require_rejected("duplicate", [&](P p) {
    auto a = trace::read_npy<std::int32_t>(p / "topk_ids.npy");
    a.data[27] = a.data[26];
    trace::write_npy<std::int32_t>(p / "topk_ids.npy", a.shape, a.data);
  }, errc::expert_out_of_range, "appears twice in the top-k of layer 1, token 3");
  require_rejected("nan_weight", [](P p) {
    auto a = trace::read_npy<float>(p / "topk_weights.npy");
    a.data[27] = std::numeric_limits<float>::quiet_NaN();
    trace::write_npy<float>(p / "topk_weights.npy", a.shape, a.data);
  }, errc::non_finite, "topk_weights.npy: weight at layer 1, token 3 is not finite");
  require_rejected("draft_without_file", [](P p) { fs::remove(p / "draft_topk_ids.npy"); }, errc::io,
                   "\"draft\" and draft_topk_ids.npy must come together");
  require_rejected("sequences", [&](P p) { spoil_header(p, "meta.json", "[[0, 5], [5, 10]]", "[[0, 6], [5, 10]]"); }, errc::io,
                   "sequence 1 [5, 10)");
  require_rejected("token_ids", [](P p) {
    std::vector<std::int64_t> const s{9};
    std::vector<std::int32_t> const ids(9, 1);
    trace::write_npy<std::int32_t>(p / "token_ids.npy", s, ids);
  }, errc::shape_mismatch, "token_ids.npy: shape [9] disagrees with meta.json's [10]");
  specmoe::test::require_error([] { (void)trace::read_trace("/nonexistent/specmoe/trace"); }, errc::io, "not a trace directory");
}

TEST_CASE("trace: write_trace checks first and writes nothing for a bad trace", "[trace][errors]") {
  temp_dir dir("bad_write");
  auto tr = random_trace(3, 2, 8, 2, 6, false);
  tr.topk_ids[5] = 99;
  specmoe::test::require_error([&] { trace::write_trace(dir.path / "out", tr); }, errc::expert_out_of_range, "expert id 99");
  CHECK(!fs::exists(dir.path / "out"));
  tr = random_trace(3, 2, 8, 2, 6, false);
  tr.topk_ids.pop_back();
  specmoe::test::require_error([&] { trace::write_trace(dir.path / "out", tr); }, errc::shape_mismatch, "meta.json promises [2, 6, 2]");
  CHECK(!fs::exists(dir.path / "out"));
}
