// specmoe/offload/detail/residency_kernels.cuh: the tiny kernel that writes the device residency
// table in stream order (internal).
//
// NOTES: the updates travel as kernel parameters (by value), so nothing on the host must outlive
// the launch, and the write happens exactly where the launch sits in the copy stream: after the
// copy before it. Entries are written with 64-bit atomics because two streams may touch one
// expert's entry (a stale "clear if it still points at slot s" on the speculative stream and a
// fresh "points at slot t" on the demand stream); the compare-and-swap makes the stale clear a
// no-op whichever runs first.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace specmoe::offload::detail {

/// One expert's three table entries: publish `block` (gate at block + 0, up at block + up_offset,
/// down at block + down_offset) or, with `clear`, reset them to null if they still hold `block`.
struct table_write {
  std::int64_t gate_entry = 0;  ///< index of the gate entry; up and down follow `experts` entries apart
  unsigned long long block = 0;  ///< slot address (bytes) of the expert
  int clear = 0;
};

inline constexpr int table_writes_per_launch = 32;

struct table_write_batch {
  table_write writes[table_writes_per_launch];
  int count = 0;
};

static __global__ void write_residency_table(unsigned long long* tables, int experts, unsigned long long up_offset,
                                             unsigned long long down_offset, table_write_batch batch) {
  int const i = static_cast<int>(threadIdx.x);
  if (i >= batch.count) return;
  table_write const w = batch.writes[i];
  unsigned long long const values[3] = {w.block, w.block + up_offset, w.block + down_offset};
  for (int m = 0; m < 3; ++m) {
    unsigned long long* const entry = tables + w.gate_entry + static_cast<std::int64_t>(m) * experts;
    if (w.clear) {
      atomicCAS(entry, values[m], 0ull);
    } else {
      atomicExch(entry, values[m]);
    }
  }
}

}  // namespace specmoe::offload::detail
