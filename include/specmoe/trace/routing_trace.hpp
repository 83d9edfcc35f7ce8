// specmoe/trace/routing_trace.hpp: a routing trace in memory, and its directory format
// (../shared/TRACES.md): meta.json, topk_ids.npy, optional topk_weights.npy, token_ids.npy and
// draft_topk_ids.npy. Every tool that reads or writes routing data goes through here.
//
// `read_trace` checks everything before returning: the JSON, each array's header and dtype, shapes
// against meta.json, expert ids in range, no expert twice in one token's top-k, finite weights,
// request ranges in order. Errors name the file and the first offending layer and token.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/core/routing.hpp>
#include <specmoe/detail/json.hpp>
#include <specmoe/trace/npy.hpp>

#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <utility>
#include <vector>

namespace specmoe::trace {

inline constexpr char const* trace_format = "specmoe-trace/1";

/// The draft model's routing shape (SP-MoE), present when the trace carries draft_topk_ids.npy.
struct draft_meta {
  std::string model;
  int layers = 0;
  int experts = 0;
  int top_k = 0;
};

/// meta.json.
struct trace_meta {
  std::string model;   ///< free text, e.g. "Mixtral-8x7B-Instruct-v0.1" or "synthetic:..."
  int layers = 0;
  int experts = 0;
  int top_k = 0;
  std::int64_t tokens = 0;
  std::vector<std::pair<std::int64_t, std::int64_t>> sequences;  ///< half-open [begin, end), one request each, in order
  std::string source;  ///< how it was made
  std::optional<draft_meta> draft;
};

/// A whole trace. Arrays are C order: topk_ids[(layer * tokens + t) * top_k + j].
struct routing_trace {
  trace_meta meta;
  std::vector<std::int32_t> topk_ids;        ///< [layers, tokens, top_k]
  std::vector<float> topk_weights;           ///< [layers, tokens, top_k] or empty
  std::vector<std::int32_t> token_ids;       ///< [tokens] or empty
  std::vector<std::int32_t> draft_topk_ids;  ///< [draft.layers, tokens, draft.top_k] or empty

  [[nodiscard]] std::int32_t id(int layer, std::int64_t t, int j) const noexcept {
    return topk_ids[static_cast<std::size_t>((layer * meta.tokens + t) * meta.top_k + j)];
  }
  [[nodiscard]] bool has_weights() const noexcept { return !topk_weights.empty(); }
  [[nodiscard]] bool has_token_ids() const noexcept { return !token_ids.empty(); }

  /// Layer `layer`'s routing as the layers take it; traces without weights get 1/top_k each
  /// (kept in `scratch`, which must outlive the view).
  [[nodiscard]] routing_view layer_routing(int layer, std::vector<float>& scratch) const {
    auto const per_layer = static_cast<std::size_t>(meta.tokens * meta.top_k);
    auto const first = static_cast<std::size_t>(layer) * per_layer;
    std::span<float const> w;
    if (has_weights()) {
      w = std::span<float const>(topk_weights.data() + first, per_layer);
    } else {
      scratch.assign(per_layer, 1.0f / static_cast<float>(meta.top_k));
      w = scratch;
    }
    return routing_view{std::span<std::int32_t const>(topk_ids.data() + first, per_layer), w, meta.tokens, meta.top_k};
  }
};

namespace trace_detail {

inline void check_ids(std::vector<std::int32_t> const& ids, std::int64_t layers, std::int64_t tokens, int top_k, int experts,
                      std::string const& file) {
  for (std::int64_t l = 0; l < layers; ++l) {
    for (std::int64_t t = 0; t < tokens; ++t) {
      auto const* row = ids.data() + (l * tokens + t) * top_k;
      for (int j = 0; j < top_k; ++j) {
        SPECMOE_EXPECTS(row[j] >= 0 && row[j] < experts, errc::expert_out_of_range, file, ": expert id ", row[j], " at layer ", l,
                        ", token ", t, " is outside [0, ", experts, ")");
        for (int i = 0; i < j; ++i) {
          SPECMOE_EXPECTS(row[i] != row[j], errc::expert_out_of_range, file, ": expert ", row[j], " appears twice in the top-k of layer ",
                          l, ", token ", t);
        }
      }
    }
  }
}

inline std::string read_text(std::filesystem::path const& path) {
  std::ifstream in(path, std::ios::binary);
  SPECMOE_EXPECTS(in.good(), errc::io, path.string(), ": cannot open (missing or unreadable)");
  std::ostringstream s;
  s << in.rdbuf();
  return s.str();
}

inline int positive_int(detail::json::value const& meta, char const* key, std::string const& file) {
  auto const v = meta.at(key, file).as_int(file + ": " + key);
  SPECMOE_EXPECTS(v > 0 && v < (std::int64_t{1} << 31), errc::io, file, ": \"", key, "\" must be a positive integer, got ", v);
  return static_cast<int>(v);
}

}  // namespace trace_detail

/// Checks a trace in memory (what `read_trace` checks after reading; `write_trace` before writing).
/// `where` names the trace in errors (its directory).
inline void validate_trace(routing_trace const& tr, std::string const& where) {
  auto const& m = tr.meta;
  std::string const meta_file = where + "/meta.json";
  SPECMOE_EXPECTS(m.layers > 0 && m.experts > 0 && m.top_k > 0 && m.tokens >= 0, errc::io, meta_file,
                  ": layers, experts and top_k must be positive and tokens non-negative");
  SPECMOE_EXPECTS(m.top_k <= m.experts, errc::io, meta_file, ": top_k ", m.top_k, " exceeds experts ", m.experts);
  std::int64_t prev_end = 0;
  for (std::size_t r = 0; r < m.sequences.size(); ++r) {
    auto const [b, e] = m.sequences[r];
    SPECMOE_EXPECTS(b >= prev_end && b < e && e <= m.tokens, errc::io, meta_file, ": sequence ", r, " [", b, ", ", e,
                    ") must be non-empty, within [0, ", m.tokens, ") and after the previous one");
    prev_end = e;
  }
  auto const per_layer = m.tokens * m.top_k;
  SPECMOE_EXPECTS(static_cast<std::int64_t>(tr.topk_ids.size()) == m.layers * per_layer, errc::shape_mismatch, where,
                  "/topk_ids.npy: ", tr.topk_ids.size(), " ids, meta.json promises [", m.layers, ", ", m.tokens, ", ", m.top_k, "]");
  trace_detail::check_ids(tr.topk_ids, m.layers, m.tokens, m.top_k, m.experts, where + "/topk_ids.npy");
  if (tr.has_weights()) {
    SPECMOE_EXPECTS(tr.topk_weights.size() == tr.topk_ids.size(), errc::shape_mismatch, where, "/topk_weights.npy: ",
                    tr.topk_weights.size(), " weights for ", tr.topk_ids.size(), " ids");
    for (std::size_t i = 0; i < tr.topk_weights.size(); ++i) {
      SPECMOE_EXPECTS(std::isfinite(tr.topk_weights[i]), errc::non_finite, where, "/topk_weights.npy: weight at layer ",
                      static_cast<std::int64_t>(i) / per_layer, ", token ", static_cast<std::int64_t>(i) % per_layer / m.top_k,
                      " is not finite");
    }
  }
  if (tr.has_token_ids()) {
    SPECMOE_EXPECTS(static_cast<std::int64_t>(tr.token_ids.size()) == m.tokens, errc::shape_mismatch, where, "/token_ids.npy: ",
                    tr.token_ids.size(), " ids for ", m.tokens, " tokens");
    for (std::size_t t = 0; t < tr.token_ids.size(); ++t) {
      SPECMOE_EXPECTS(tr.token_ids[t] >= 0, errc::io, where, "/token_ids.npy: token id ", tr.token_ids[t], " at position ", t,
                      " is negative");
    }
  }
  SPECMOE_EXPECTS(tr.draft_topk_ids.empty() == !m.draft.has_value(), errc::io, where,
                  ": meta.json's \"draft\" and draft_topk_ids.npy must come together");
  if (m.draft) {
    auto const& d = *m.draft;
    SPECMOE_EXPECTS(d.layers > 0 && d.experts > 0 && d.top_k > 0 && d.top_k <= d.experts, errc::io, meta_file,
                    ": draft layers, experts and top_k must be positive, top_k <= experts");
    SPECMOE_EXPECTS(static_cast<std::int64_t>(tr.draft_topk_ids.size()) == d.layers * m.tokens * d.top_k, errc::shape_mismatch,
                    where, "/draft_topk_ids.npy: ", tr.draft_topk_ids.size(), " ids, meta.json promises [", d.layers, ", ", m.tokens,
                    ", ", d.top_k, "]");
    trace_detail::check_ids(tr.draft_topk_ids, d.layers, m.tokens, d.top_k, d.experts, where + "/draft_topk_ids.npy");
  }
}

/// Reads and checks the trace in directory `dir`.
/// @throw specmoe::error (io, shape_mismatch, expert_out_of_range, non_finite) naming the file.
inline routing_trace read_trace(std::filesystem::path const& dir) {
  std::string const where = dir.string();
  SPECMOE_EXPECTS(std::filesystem::is_directory(dir), errc::io, where, ": not a trace directory (missing)");
  std::string const meta_file = (dir / "meta.json").string();
  auto const meta = detail::json::parse(trace_detail::read_text(dir / "meta.json"), meta_file);
  SPECMOE_EXPECTS(meta.is_object(), errc::io, meta_file, ": must hold a JSON object");
  auto const& format = meta.at("format", meta_file).as_string(meta_file + ": format");
  SPECMOE_EXPECTS(format == trace_format, errc::io, meta_file, ": format \"", format, "\" is not \"", trace_format, "\"");
  routing_trace tr;
  auto& m = tr.meta;
  if (auto const* v = meta.find("model")) m.model = v->as_string(meta_file + ": model");
  if (auto const* v = meta.find("source")) m.source = v->as_string(meta_file + ": source");
  m.layers = trace_detail::positive_int(meta, "layers", meta_file);
  m.experts = trace_detail::positive_int(meta, "experts", meta_file);
  m.top_k = trace_detail::positive_int(meta, "top_k", meta_file);
  m.tokens = meta.at("tokens", meta_file).as_int(meta_file + ": tokens");
  if (auto const* v = meta.find("sequences")) {
    for (auto const& r : v->as_array(meta_file + ": sequences")) {
      auto const& pair = r.as_array(meta_file + ": each sequence");
      SPECMOE_EXPECTS(pair.size() == 2, errc::io, meta_file, ": each sequence must be [begin, end]");
      m.sequences.emplace_back(pair[0].as_int(meta_file + ": sequence begin"), pair[1].as_int(meta_file + ": sequence end"));
    }
  }
  if (auto const* v = meta.find("draft"); v && !v->is_null()) {
    std::string const what = meta_file + ": draft";
    draft_meta d;
    if (auto const* dm = v->find("model")) d.model = dm->as_string(what + ".model");
    d.layers = trace_detail::positive_int(*v, "layers", what);
    d.experts = trace_detail::positive_int(*v, "experts", what);
    d.top_k = trace_detail::positive_int(*v, "top_k", what);
    m.draft = d;
  }

  auto const expect_shape = [&](std::vector<std::int64_t> const& got, std::vector<std::int64_t> const& want, std::string const& file) {
    auto str = [](std::vector<std::int64_t> const& s) {
      std::string r = "[";
      for (std::size_t i = 0; i < s.size(); ++i) r += (i ? ", " : "") + std::to_string(s[i]);
      return r + "]";
    };
    SPECMOE_EXPECTS(got == want, errc::shape_mismatch, file, ": shape ", str(got), " disagrees with meta.json's ", str(want));
  };
  std::vector<std::int64_t> const routing_shape{m.layers, m.tokens, m.top_k};
  {
    auto a = read_npy<std::int32_t>(dir / "topk_ids.npy");
    expect_shape(a.shape, routing_shape, (dir / "topk_ids.npy").string());
    tr.topk_ids = std::move(a.data);
  }
  if (std::filesystem::exists(dir / "topk_weights.npy")) {
    auto a = read_npy<float>(dir / "topk_weights.npy");
    expect_shape(a.shape, routing_shape, (dir / "topk_weights.npy").string());
    tr.topk_weights = std::move(a.data);
  }
  if (std::filesystem::exists(dir / "token_ids.npy")) {
    auto a = read_npy<std::int32_t>(dir / "token_ids.npy");
    expect_shape(a.shape, {m.tokens}, (dir / "token_ids.npy").string());
    tr.token_ids = std::move(a.data);
  }
  bool const has_draft_file = std::filesystem::exists(dir / "draft_topk_ids.npy");
  SPECMOE_EXPECTS(has_draft_file == m.draft.has_value(), errc::io, where,
                  ": meta.json's \"draft\" and draft_topk_ids.npy must come together");
  if (has_draft_file) {
    auto a = read_npy<std::int32_t>(dir / "draft_topk_ids.npy");
    expect_shape(a.shape, {m.draft->layers, m.tokens, m.draft->top_k}, (dir / "draft_topk_ids.npy").string());
    tr.draft_topk_ids = std::move(a.data);
  }
  validate_trace(tr, where);
  return tr;
}

/// Checks `tr`, then writes it to directory `dir` (created if missing; existing trace files replaced).
inline void write_trace(std::filesystem::path const& dir, routing_trace const& tr) {
  std::string const where = dir.string();
  validate_trace(tr, where);
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  SPECMOE_EXPECTS(!ec && std::filesystem::is_directory(dir), errc::io, where, ": cannot create the directory (", ec.message(), ")");
  auto const& m = tr.meta;
  using detail::json::value;
  detail::json::array seqs;
  for (auto const& [b, e] : m.sequences) seqs.emplace_back(detail::json::array{value(b), value(e)});
  detail::json::object meta{{"format", trace_format},           {"model", m.model},
                            {"layers", m.layers},               {"experts", m.experts},
                            {"top_k", m.top_k},                 {"tokens", value(m.tokens)},
                            {"sequences", value(std::move(seqs))}, {"source", m.source}};
  if (m.draft) {
    meta.emplace_back("draft", detail::json::object{{"model", m.draft->model},
                                                     {"layers", m.draft->layers},
                                                     {"experts", m.draft->experts},
                                                     {"top_k", m.draft->top_k}});
  }
  {
    std::ofstream out(dir / "meta.json", std::ios::trunc);
    SPECMOE_EXPECTS(out.good(), errc::io, (dir / "meta.json").string(), ": cannot open for writing");
    out << value(std::move(meta)).dump(true) << '\n';
    SPECMOE_EXPECTS(out.good(), errc::io, (dir / "meta.json").string(), ": write failed");
  }
  std::vector<std::int64_t> const shape{m.layers, m.tokens, m.top_k};
  write_npy<std::int32_t>(dir / "topk_ids.npy", shape, tr.topk_ids);
  std::filesystem::remove(dir / "topk_weights.npy");
  std::filesystem::remove(dir / "token_ids.npy");
  std::filesystem::remove(dir / "draft_topk_ids.npy");
  if (tr.has_weights()) write_npy<float>(dir / "topk_weights.npy", shape, tr.topk_weights);
  if (tr.has_token_ids()) {
    std::vector<std::int64_t> const tshape{m.tokens};
    write_npy<std::int32_t>(dir / "token_ids.npy", tshape, tr.token_ids);
  }
  if (m.draft) {
    std::vector<std::int64_t> const dshape{m.draft->layers, m.tokens, m.draft->top_k};
    write_npy<std::int32_t>(dir / "draft_topk_ids.npy", dshape, tr.draft_topk_ids);
  }
}

}  // namespace specmoe::trace
