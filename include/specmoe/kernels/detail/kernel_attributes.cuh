// specmoe/kernels/detail/kernel_attributes.cuh: kernel attributes are per device (per context), so
// a process that drives several GPUs (one thread per rank) must set them on each: a process-wide
// "set once" leaves every GPU but the first refusing the launch.
#pragma once

#include <cuda_runtime.h>

#include <mutex>
#include <set>
#include <tuple>

namespace specmoe::kernels::detail {

/// cudaFuncAttributeMaxDynamicSharedMemorySize = bytes for `kernel` on the current device, once
/// per (kernel, device, bytes).
inline cudaError_t allow_dynamic_smem(void const* kernel, int bytes) {
  static std::mutex m;
  static std::set<std::tuple<void const*, int, int>> done;
  int device = 0;
  if (cudaError_t const e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::lock_guard lock(m);
  auto const key = std::make_tuple(kernel, device, bytes);
  if (done.contains(key)) return cudaSuccess;
  cudaError_t const e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e == cudaSuccess) done.insert(key);
  return e;
}

}  // namespace specmoe::kernels::detail
