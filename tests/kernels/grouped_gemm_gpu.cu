// tests/kernels/grouped_gemm_gpu.cu: the Catch2-free side of the grouped-GEMM test (see the header).
#include "grouped_gemm_gpu.hpp"

#include <specmoe/kernels/decode_expert_ffn.cuh>
#include <specmoe/kernels/grouped_gemm.cuh>

namespace gg_test {

namespace sk = specmoe::kernels;
using dbf16 = __nv_bfloat16;

struct weight_maps {
  sk::grouped_weight_maps maps;
};

void weight_maps_deleter::operator()(weight_maps* m) const noexcept { delete m; }

namespace {
sk::grouped_gemm_path to_sk(path p) {
  switch (p) {
    case path::stream: return sk::grouped_gemm_path::stream;
    case path::stream_registers: return sk::grouped_gemm_path::stream_registers;
    case path::mma: return sk::grouped_gemm_path::mma;
    case path::wgmma: return sk::grouped_gemm_path::wgmma;
    default: return sk::grouped_gemm_path::automatic;
  }
}
dbf16 const* const* table(void const* const* t) { return reinterpret_cast<dbf16 const* const*>(t); }
sk::grouped_weight_maps const* raw(weight_maps const* m) { return m ? &m->maps : nullptr; }
}  // namespace

weight_maps_ptr make_gate_up_maps(void const* const* w_gate, void const* const* w_up, int G, std::int64_t rows, int K, std::int64_t ld) {
  return weight_maps_ptr(new weight_maps{sk::grouped_weight_maps(table(w_gate), table(w_up), G, rows, K, ld)});
}
weight_maps_ptr make_down_maps(void const* const* w, int G, std::int64_t rows, int K, std::int64_t ld) {
  return weight_maps_ptr(new weight_maps{sk::grouped_weight_maps(table(w), G, rows, K, ld)});
}
weight_maps_ptr make_empty_maps() { return weight_maps_ptr(new weight_maps{}); }
cudaError_t maps_status(weight_maps const* m) { return m->maps.status(); }

cudaError_t gate_up(void const* x, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_gate,
                    void const* const* w_up, std::int64_t ld, int K, int F, void* h, cudaStream_t stream, path p,
                    weight_maps const* maps) {
  return sk::launch_grouped_gate_up_swiglu(static_cast<dbf16 const*>(x), offsets, G, M_total, reinterpret_cast<dbf16 const* const*>(w_gate),
                                           reinterpret_cast<dbf16 const* const*>(w_up), ld, K, F, static_cast<dbf16*>(h), stream, to_sk(p),
                                           raw(maps));
}
cudaError_t gate_up_gathered(void const* x, std::int32_t const* slots, int top_k, std::int64_t const* offsets, int G,
                             std::int64_t M_total, void const* const* w_gate, void const* const* w_up, std::int64_t ld, int K, int F,
                             void* h, cudaStream_t stream, path p, weight_maps const* maps) {
  return sk::launch_grouped_gate_up_swiglu_gathered(static_cast<dbf16 const*>(x), slots, top_k, offsets, G, M_total, table(w_gate),
                                                    table(w_up), ld, K, F, static_cast<dbf16*>(h), stream, to_sk(p), raw(maps));
}
bool stream_bulk_runs(int G, int nmat) {
  return nmat == 2 ? sk::stream_bulk_detail::runs<2, dbf16>(G) : sk::stream_bulk_detail::runs<1, dbf16>(G);
}
bool stream_bulk_launched_for(int G, int nmat) {
  cudaFuncAttributes attr{};
  cudaError_t const e = nmat == 2 ? cudaFuncGetAttributes(&attr, sk::stream_bulk_detail::grouped_stream_bulk_kernel<2, dbf16>)
                                  : cudaFuncGetAttributes(&attr, sk::stream_bulk_detail::grouped_stream_bulk_kernel<1, dbf16>);
  auto const need = nmat == 2 ? sk::stream_bulk_detail::smem_bytes<2>(G) : sk::stream_bulk_detail::smem_bytes<1>(G);
  return e == cudaSuccess && static_cast<std::size_t>(attr.maxDynamicSharedSizeBytes) >= need;
}
bool gemm_streams(int G, std::int64_t M_total, int N, int nmat, weight_maps const* maps) {
  return sk::grouped_gemm_streams(G, M_total, N, nmat, raw(maps));
}
cudaError_t down(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_down, std::int64_t ld,
                 int F, int N, void* y_bf16, cudaStream_t stream, path p, weight_maps const* maps) {
  return sk::launch_grouped_down(static_cast<dbf16 const*>(h), offsets, G, M_total, reinterpret_cast<dbf16 const* const*>(w_down), ld, F,
                                 N, static_cast<dbf16*>(y_bf16), stream, to_sk(p), raw(maps));
}
cudaError_t down_f32(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, void const* const* w_down,
                     std::int64_t ld, int F, int N, float* y, cudaStream_t stream, path p, weight_maps const* maps) {
  return sk::launch_grouped_down(static_cast<dbf16 const*>(h), offsets, G, M_total, reinterpret_cast<dbf16 const* const*>(w_down), ld, F,
                                 N, y, stream, to_sk(p), raw(maps));
}
std::size_t workspace_bytes(int G, std::int64_t M_total) { return sk::grouped_gemm_workspace_bytes(G, M_total); }
cudaError_t gate_up_wgmma(void const* x, std::int64_t const* offsets, int G, std::int64_t M_total, int K, int F, void* h,
                          weight_maps const* maps, bool staged) {
  namespace w = sk::wgmma_detail;
  if (!w::can_launch<true, dbf16>(G, M_total)) return cudaErrorNotSupported;
  auto const& m = maps->maps;
  return w::launch<true, dbf16>(static_cast<dbf16 const*>(x), offsets, G, M_total, m.device_maps(0), m.device_maps(1), K, F,
                                static_cast<dbf16*>(h), m.tile_counters(), nullptr, staged ? w::epilogue::staged : w::epilogue::direct);
}
cudaError_t gate_up_wgmma_gathered(void const* x, std::int32_t const* slots, int top_k, std::int64_t const* offsets, int G,
                                  std::int64_t M_total, int K, int F, void* h, weight_maps const* maps, bool staged) {
  namespace w = sk::wgmma_detail;
  if (!w::can_launch_gathered(G, M_total)) return cudaErrorNotSupported;
  auto const& m = maps->maps;
  return w::launch<true, dbf16>(static_cast<dbf16 const*>(x), offsets, G, M_total, m.device_maps(0), m.device_maps(1), K, F,
                                static_cast<dbf16*>(h), m.tile_counters(), nullptr, staged ? w::epilogue::staged : w::epilogue::direct,
                                w::a_gather{slots, top_k});
}
bool const wgmma_gather_in_layer = sk::wgmma_gather_in_layer;
bool gate_up_gather_pays(int G, std::int64_t M_total, int F, weight_maps const* maps) {
  return sk::grouped_gate_up_gather_pays(G, M_total, F, raw(maps));
}
cudaError_t down_wgmma(void const* h, std::int64_t const* offsets, int G, std::int64_t M_total, int F, int N, void* y_bf16,
                       weight_maps const* maps, bool staged) {
  namespace w = sk::wgmma_detail;
  if (!w::can_launch<false, dbf16>(G, M_total)) return cudaErrorNotSupported;
  auto const& m = maps->maps;
  return w::launch<false, dbf16>(static_cast<dbf16 const*>(h), offsets, G, M_total, m.device_maps(0), m.device_maps(0), F, N,
                                 static_cast<dbf16*>(y_bf16), m.tile_counters(), nullptr, staged ? w::epilogue::staged : w::epilogue::direct);
}

namespace {
sk::decode_expert_ffn_args to_sk(decode_ffn_args const& a) {
  sk::decode_expert_ffn_args r;
  r.x = static_cast<dbf16 const*>(a.x);
  r.slots = a.slots;
  r.top_k = a.top_k;
  r.offsets = a.offsets;
  r.G = a.G;
  r.M_total = a.M_total;
  r.w_gate = table(a.w_gate);
  r.w_up = table(a.w_up);
  r.gate_up_ld = a.gate_up_ld;
  r.w_down = table(a.w_down);
  r.down_ld = a.down_ld;
  r.K = a.K;
  r.F = a.F;
  r.N = a.N;
  r.h = static_cast<dbf16*>(a.h);
  return r;
}
}  // namespace

cudaError_t decode_ffn(decode_ffn_args const& a, void* y_bf16, unsigned* sync, cudaStream_t stream, bool one_row_chunks) {
  return sk::launch_decode_expert_ffn(to_sk(a), static_cast<dbf16*>(y_bf16), sync, stream, one_row_chunks);
}
cudaError_t decode_ffn_f32(decode_ffn_args const& a, float* y, unsigned* sync, cudaStream_t stream, bool one_row_chunks) {
  return sk::launch_decode_expert_ffn(to_sk(a), y, sync, stream, one_row_chunks);
}
std::size_t decode_ffn_sync_words(int G) { return sk::decode_expert_ffn_sync_words(G); }

}  // namespace gg_test
