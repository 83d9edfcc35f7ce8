// specmoe/comm/nccl_bootstrap.cuh: ranks that meet through NCCL (nvcc only, SPECMOE_HAS_NCCL).
// The engine's communicator carries the setup exchanges; for engines without MPI, the NCCL unique
// id can travel through a file every rank can read.
#pragma once

#include <specmoe/comm/bootstrap.hpp>
#include <specmoe/core/cuda_error.cuh>

#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <chrono>
#include <cstddef>
#include <cstring>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>

/// Throws specmoe::error{errc::comm} naming the call and NCCL's reason when an NCCL call fails.
#define SPECMOE_NCCL_TRY(call)                                                                          \
  do {                                                                                                  \
    ncclResult_t const specmoe_nr_ = (call);                                                            \
    SPECMOE_EXPECTS(specmoe_nr_ == ncclSuccess, ::specmoe::errc::comm, #call, " failed: ",              \
                    ncclGetErrorString(specmoe_nr_), " (", ncclGetLastError(nullptr), ")");            \
  } while (0)

namespace specmoe {

/// @brief A bootstrap over an existing communicator (not owned): ncclAllGather through small
/// buffers reserved at construction, synchronised before returning. Setup only.
///
/// A process that drives several GPUs (a thread per rank) deadlocks if a rank waits for its
/// collective inside a call that holds the driver's allocation lock (a copy to pageable host
/// memory, cudaFree, a pool allocation) while a peer thread still allocates before joining. So an
/// exchange allocates nothing and copies only through pinned staging, then waits on its stream.
class nccl_bootstrap final : public bootstrap {
 public:
  /// Bytes each rank contributes per round; larger exchanges go in several rounds.
  static constexpr std::size_t chunk_bytes = 4096;

  explicit nccl_bootstrap(ncclComm_t comm) : comm_(comm) {
    SPECMOE_EXPECTS(comm != nullptr, errc::invalid_argument, "nccl_bootstrap needs a communicator");
    SPECMOE_NCCL_TRY(ncclCommUserRank(comm_, &rank_));
    SPECMOE_NCCL_TRY(ncclCommCount(comm_, &size_));
    auto const slots = static_cast<std::size_t>(size_ + 1) * chunk_bytes;  // every rank's chunk, then ours
    try {
      SPECMOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
      SPECMOE_CUDA_TRY(cudaMalloc(&device_, slots));
      SPECMOE_CUDA_TRY(cudaMallocHost(&pinned_, slots));
    } catch (...) {
      release();
      throw;
    }
  }
  nccl_bootstrap(nccl_bootstrap const&) = delete;
  nccl_bootstrap& operator=(nccl_bootstrap const&) = delete;
  ~nccl_bootstrap() override { release(); }
  [[nodiscard]] int rank() const override { return rank_; }
  [[nodiscard]] int size() const override { return size_; }
  [[nodiscard]] ncclComm_t comm() const noexcept { return comm_; }

  void allgather(void const* mine, std::size_t bytes, void* all) override {
    auto const D = static_cast<std::size_t>(size_);
    auto* own_pinned = pinned_ + D * chunk_bytes;
    auto* own_device = device_ + D * chunk_bytes;
    for (std::size_t at = 0; at < bytes; at += chunk_bytes) {
      auto const n = std::min(chunk_bytes, bytes - at);
      std::memcpy(own_pinned, static_cast<std::byte const*>(mine) + at, n);
      cudaError_t err = cudaMemcpyAsync(own_device, own_pinned, n, cudaMemcpyHostToDevice, stream_);
      ncclResult_t nr = ncclSuccess;
      if (err == cudaSuccess) nr = ncclAllGather(own_device, device_, n, ncclUint8, comm_, stream_);
      if (err == cudaSuccess && nr == ncclSuccess)
        err = cudaMemcpyAsync(pinned_, device_, n * D, cudaMemcpyDeviceToHost, stream_);
      cudaError_t const synced = cudaStreamSynchronize(stream_);
      if (err == cudaSuccess) err = synced;
      SPECMOE_EXPECTS(nr == ncclSuccess, errc::comm, "ncclAllGather at setup failed on rank ", rank_, ": ",
                      ncclGetErrorString(nr), " (", ncclGetLastError(comm_), ")");
      SPECMOE_CUDA_TRY(err);
      for (std::size_t r = 0; r < D; ++r) std::memcpy(static_cast<std::byte*>(all) + r * bytes + at, pinned_ + r * n, n);
    }
  }

 private:
  void release() noexcept {
    if (pinned_) cudaFreeHost(pinned_);
    if (device_) cudaFree(device_);
    if (stream_) cudaStreamDestroy(stream_);
    pinned_ = device_ = nullptr;
    stream_ = nullptr;
  }

  ncclComm_t comm_;
  int rank_ = 0, size_ = 1;
  cudaStream_t stream_ = nullptr;
  std::byte* device_ = nullptr;  // [size + 1][chunk_bytes]
  std::byte* pinned_ = nullptr;  // [size + 1][chunk_bytes]
};

/// @brief The NCCL unique id through a file: rank 0 creates it and writes `path` (atomically, by
/// rename); the others wait for the file, up to `timeout`. For engines without MPI or a store.
inline ncclUniqueId nccl_unique_id_via_file(std::filesystem::path const& path, int rank,
                                            std::chrono::milliseconds timeout = std::chrono::seconds(120)) {
  ncclUniqueId id{};
  if (rank == 0) {
    SPECMOE_NCCL_TRY(ncclGetUniqueId(&id));
    auto const tmp = path.string() + ".tmp";
    {
      std::ofstream f(tmp, std::ios::binary | std::ios::trunc);
      f.write(id.internal, sizeof id.internal);
      SPECMOE_EXPECTS(f.good(), errc::io, "cannot write the NCCL unique id to ", tmp);
    }
    std::error_code ec;
    std::filesystem::rename(tmp, path, ec);
    SPECMOE_EXPECTS(!ec, errc::io, "cannot move ", tmp, " to ", path.string(), ": ", ec.message());
    return id;
  }
  auto const deadline = std::chrono::steady_clock::now() + timeout;
  while (true) {
    std::ifstream f(path, std::ios::binary);
    if (f && f.read(id.internal, sizeof id.internal) && f.gcount() == static_cast<std::streamsize>(sizeof id.internal))
      return id;
    SPECMOE_EXPECTS(std::chrono::steady_clock::now() < deadline, errc::timeout, "rank ", rank, " waited ",
                    timeout.count(), " ms for rank 0 to write the NCCL unique id to ", path.string());
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
}

}  // namespace specmoe
