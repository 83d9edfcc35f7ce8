// specmoe-trace-gen: writes a synthetic routing trace (../shared/TRACES.md format) with the knobs of
// synthetic/trace_generator.hpp; defaults follow published statistics of real models.
//
//   specmoe-trace-gen --out DIR [--model qwen3_30b_a3b|deepseek_v3|deepseek_v2_lite|mixtral] [--layers L] [--tokens N]
//                     [--affinity A] [--layer-correlation C] [--expert-zipf S] [--topics T] [--draft-layers K] [--draft-agreement A] [--seed S]
//                     [--sample-seed S]   (same --seed, another --sample-seed: a held-out trace of the same model)
#include <specmoe/detail/cli.hpp>
#include <specmoe/core/moe_config.hpp>
#include <specmoe/synthetic/trace_generator.hpp>

#include <cstdio>
#include <exception>

int main(int argc, char** argv) {
  using namespace specmoe;
  detail::cli::args a(argc, argv, "specmoe-trace-gen",
                      "specmoe-trace-gen --out DIR [--model qwen3_30b_a3b|deepseek_v3|deepseek_v2_lite|mixtral] [--layers L] [--tokens N] "
                      "[--affinity A] [--layer-correlation C] [--expert-zipf S] [--token-zipf S] [--vocab V] [--requests R] "
                      "[--topics T] [--draft-layers K] [--draft-agreement A] [--seed S] [--sample-seed S]");
  try {
    auto const out = a.required("--out");
    auto const model = a.choice("--model", "qwen3_30b_a3b", {"qwen3_30b_a3b", "deepseek_v3", "deepseek_v2_lite", "mixtral"});
    synthetic::trace_params p;
    auto const cfg = model == "deepseek_v3"        ? models::deepseek_v3()
                     : model == "deepseek_v2_lite" ? models::deepseek_v2_lite()
                     : model == "mixtral"          ? models::mixtral_8x7b()
                                                   : models::qwen3_30b_a3b();
    p.experts = cfg.num_experts;
    p.top_k = cfg.top_k;
    p.model = "synthetic:" + model;
    p.layers = static_cast<int>(a.integer("--layers", model == "deepseek_v3" ? 58 : model == "deepseek_v2_lite" ? 26 : model == "mixtral" ? 32 : 48, 1, 1024));
    p.tokens = a.integer("--tokens", 16384, 1, 1ll << 28);
    p.affinity = a.real("--affinity", p.affinity, 0, 1);
    p.layer_correlation = a.real("--layer-correlation", p.layer_correlation, 0, 1);
    p.expert_zipf = a.real("--expert-zipf", p.expert_zipf, 0, 10);
    p.token_zipf = a.real("--token-zipf", p.token_zipf, 0, 10);
    p.vocab = static_cast<int>(a.integer("--vocab", p.vocab, 1, 1 << 24));
    p.requests = static_cast<int>(a.integer("--requests", p.requests, 1, 1 << 24));
    p.topics = static_cast<int>(a.integer("--topics", 0, 0, 1 << 20));
    p.draft_layers = static_cast<int>(a.integer("--draft-layers", 0, 0, 1024));
    p.draft_agreement = a.real("--draft-agreement", p.draft_agreement, 0, 1);
    p.seed = static_cast<std::uint64_t>(a.integer("--seed", 1, 0, 1ll << 62));
    p.sample_seed = static_cast<std::uint64_t>(a.integer("--sample-seed", 0, 0, 1ll << 62));
    a.finish();
    auto const tr = synthetic::generate_trace(p);
    trace::write_trace(out, tr);
    std::printf("{\"trace\": \"%s\", \"layers\": %d, \"experts\": %d, \"top_k\": %d, \"tokens\": %lld}\n", out.c_str(), p.layers,
                p.experts, p.top_k, static_cast<long long>(p.tokens));
  } catch (std::exception const& e) {
    std::fprintf(stderr, "specmoe-trace-gen: %s\n", e.what());
    return 1;
  }
  return 0;
}
