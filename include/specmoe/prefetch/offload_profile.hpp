// specmoe/prefetch/offload_profile.hpp: the measured inputs of SP-MoE's latency model, saved as
// JSON ("specmoe-offload-profile/1") so a cutoff is chosen from numbers of the user's own machine.
//
// A profile says how long one expert takes to cross the link, how long the draft model takes, how
// long each target layer computes with its experts resident, and how often the draft's routing
// names the experts verification needs, per layer. The GPU runtime measures the times
// (offload/measure_profile.cuh); the accuracies come from a trace with draft routing
// (prefetch/latency_model.hpp: draft_accuracy) or from the runtime's counters.
#pragma once

#include <specmoe/core/error.hpp>
#include <specmoe/detail/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

namespace specmoe::prefetch {

inline constexpr char const* offload_profile_format = "specmoe-offload-profile/1";

/// @brief One machine x model x verification width. Times in microseconds, sizes in bytes.
struct offload_profile {
  std::string device = "unmeasured defaults";  ///< free text: where it was measured
  std::string model;                           ///< free text
  int layers = 0;                              ///< target MoE layers
  int experts = 0;                             ///< routed experts per layer
  int top_k = 0;
  int gamma = 1;                               ///< draft tokens per verification (verification = gamma + 1 tokens)
  double acceptance = 0.97;                    ///< probability a drafted token is accepted
  double expert_bytes = 0;                     ///< one routed expert (gate + up + down)
  double link_bytes_per_us = 55.0e3;           ///< host-to-device bandwidth (55 GB/s = pinned H100/H200, measured)
  double copy_latency_us = 10.0;               ///< fixed cost per copy batch (launch, DMA setup)
  double draft_pass_us = 0;                    ///< one draft forward of one token, all draft layers
  /// What reading one draft layer's routing back costs the draft pass (the stream drains, the host
  /// reads the ids and queues the prefetch, the next layer launches), paid for every layer below
  /// the cutoff. Optional in the file (0). Without it the model expected deep cutoffs to gain where
  /// the GPU measured a loss (docs/benchmarks.md, issue 7).
  double draft_readback_us = 0;
  std::vector<double> attn_us;                 ///< [layers] target dense part (attention, norms) of verification
  std::vector<double> moe_us;                  ///< [layers] target expert compute of verification, experts resident
  std::vector<double> accuracy;                ///< [layers] share of verification's experts the draft predicted

  /// Time one expert takes on the link, alone.
  [[nodiscard]] double expert_copy_us() const noexcept { return copy_latency_us + expert_bytes / link_bytes_per_us; }
  /// The target's compute per verification with every expert resident.
  [[nodiscard]] double resident_compute_us() const noexcept {
    double t = 0;
    for (int l = 0; l < layers; ++l) t += attn_us[static_cast<std::size_t>(l)] + moe_us[static_cast<std::size_t>(l)];
    return t;
  }
};

/// @brief Checks a profile; `where` names it in errors (a file, or "offload_profile").
/// @throw specmoe::error invalid_argument naming the first bad field.
inline void validate_profile(offload_profile const& p, std::string const& where = "offload_profile") {
  auto finite_nonneg = [](double v) { return std::isfinite(v) && v >= 0; };
  SPECMOE_EXPECTS(p.layers > 0 && p.experts > 0 && p.top_k > 0 && p.top_k <= p.experts, errc::invalid_argument, where,
                  ": layers (", p.layers, "), experts (", p.experts, ") and top_k (", p.top_k,
                  ") must be positive with top_k <= experts");
  SPECMOE_EXPECTS(p.gamma >= 1 && p.gamma <= 64, errc::invalid_argument, where, ": gamma ", p.gamma, " must lie in [1, 64]");
  SPECMOE_EXPECTS(std::isfinite(p.acceptance) && p.acceptance >= 0 && p.acceptance <= 1, errc::invalid_argument, where,
                  ": acceptance ", p.acceptance, " must lie in [0, 1]");
  SPECMOE_EXPECTS(std::isfinite(p.expert_bytes) && p.expert_bytes > 0, errc::invalid_argument, where, ": expert_bytes ",
                  p.expert_bytes, " must be positive");
  SPECMOE_EXPECTS(std::isfinite(p.link_bytes_per_us) && p.link_bytes_per_us > 0, errc::invalid_argument, where,
                  ": link_bytes_per_us ", p.link_bytes_per_us, " must be positive");
  SPECMOE_EXPECTS(finite_nonneg(p.copy_latency_us) && finite_nonneg(p.draft_pass_us) && finite_nonneg(p.draft_readback_us),
                  errc::invalid_argument, where, ": copy_latency_us, draft_pass_us and draft_readback_us must be finite and >= 0");
  auto check_layers = [&](std::vector<double> const& v, char const* name, double hi) {
    SPECMOE_EXPECTS(static_cast<int>(v.size()) == p.layers, errc::invalid_argument, where, ": ", name, " has ", v.size(),
                    " entries, layers is ", p.layers);
    for (std::size_t l = 0; l < v.size(); ++l) {
      SPECMOE_EXPECTS(finite_nonneg(v[l]) && v[l] <= hi, errc::invalid_argument, where, ": ", name, "[", l, "] = ", v[l],
                      " must be finite, >= 0", hi < 1e300 ? " and <= 1" : "");
    }
  };
  check_layers(p.attn_us, "attn_us", 1e301);
  check_layers(p.moe_us, "moe_us", 1e301);
  check_layers(p.accuracy, "accuracy", 1.0);
}

/// @brief A profile of documented defaults for a model shape, for planning before measuring:
/// link 55 GB/s (pinned, measured on the H100/H200 machines), per-layer compute from HBM
/// streaming of the activated weights at 3 TB/s plus a 20 us floor, the draft a dense model of
/// `draft_bytes` streamed at the same rate, accuracy 0.8 everywhere.
inline offload_profile default_profile(int layers, int experts, int top_k, double expert_bytes, double dense_bytes_per_layer,
                                       double draft_bytes, int gamma = 1) {
  offload_profile p;
  p.model = "defaults";
  p.layers = layers;
  p.experts = experts;
  p.top_k = top_k;
  p.gamma = gamma;
  p.expert_bytes = expert_bytes;
  double const hbm_bytes_per_us = 3.0e6;
  p.draft_pass_us = 20.0 * layers + draft_bytes / hbm_bytes_per_us;
  p.attn_us.assign(static_cast<std::size_t>(layers), 20.0 + dense_bytes_per_layer / hbm_bytes_per_us);
  double const tokens = gamma + 1;
  double const touched = std::min<double>(experts, top_k * tokens);
  p.moe_us.assign(static_cast<std::size_t>(layers), 20.0 + touched * expert_bytes / hbm_bytes_per_us);
  p.accuracy.assign(static_cast<std::size_t>(layers), 0.8);
  validate_profile(p);
  return p;
}

namespace profile_detail {
inline detail::json::value doubles(std::vector<double> const& v) {
  detail::json::array a;
  a.reserve(v.size());
  for (double x : v) a.emplace_back(x);
  return detail::json::value(std::move(a));
}
inline std::vector<double> doubles(detail::json::value const& v, std::string const& what) {
  std::vector<double> out;
  for (auto const& x : v.as_array(what)) out.push_back(x.as_double(what));
  return out;
}
}  // namespace profile_detail

/// Writes `p` as "specmoe-offload-profile/1" JSON.
inline void write_profile(std::filesystem::path const& path, offload_profile const& p) {
  validate_profile(p);
  using detail::json::value;
  using profile_detail::doubles;
  detail::json::object doc{{"format", offload_profile_format},
                           {"device", p.device},
                           {"model", p.model},
                           {"layers", p.layers},
                           {"experts", p.experts},
                           {"top_k", p.top_k},
                           {"gamma", p.gamma},
                           {"acceptance", p.acceptance},
                           {"expert_bytes", p.expert_bytes},
                           {"link_bytes_per_us", p.link_bytes_per_us},
                           {"copy_latency_us", p.copy_latency_us},
                           {"draft_pass_us", p.draft_pass_us},
                           {"draft_readback_us", p.draft_readback_us},
                           {"attn_us", doubles(p.attn_us)},
                           {"moe_us", doubles(p.moe_us)},
                           {"accuracy", doubles(p.accuracy)}};
  detail::json::write_file(path, value(std::move(doc)));
}

/// Reads and checks a profile written by write_profile (or by hand).
/// @throw specmoe::error io (unreadable, wrong format) or invalid_argument (a bad field), naming the file.
inline offload_profile read_profile(std::filesystem::path const& path) {
  std::string const file = path.string();
  auto const doc = detail::json::read_file(path, offload_profile_format);
  offload_profile p;
  auto num = [&](char const* key) { return doc.at(key, file).as_double(file + ": " + key); };
  auto integer = [&](char const* key) { return static_cast<int>(doc.at(key, file).as_int(file + ": " + key)); };
  if (auto const* d = doc.find("device")) p.device = d->as_string(file + ": device");
  if (auto const* m = doc.find("model")) p.model = m->as_string(file + ": model");
  p.layers = integer("layers");
  p.experts = integer("experts");
  p.top_k = integer("top_k");
  p.gamma = integer("gamma");
  p.acceptance = num("acceptance");
  p.expert_bytes = num("expert_bytes");
  p.link_bytes_per_us = num("link_bytes_per_us");
  p.copy_latency_us = num("copy_latency_us");
  p.draft_pass_us = num("draft_pass_us");
  if (auto const* r = doc.find("draft_readback_us")) p.draft_readback_us = r->as_double(file + ": draft_readback_us");
  p.attn_us = profile_detail::doubles(doc.at("attn_us", file), file + ": attn_us");
  p.moe_us = profile_detail::doubles(doc.at("moe_us", file), file + ": moe_us");
  p.accuracy = profile_detail::doubles(doc.at("accuracy", file), file + ": accuracy");
  validate_profile(p, file);
  return p;
}

}  // namespace specmoe::prefetch
