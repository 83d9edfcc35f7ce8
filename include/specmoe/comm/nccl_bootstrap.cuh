// specmoe/comm/nccl_bootstrap.cuh: ranks that meet through NCCL (nvcc only, SPECMOE_HAS_NCCL).
// The engine's communicator carries the setup exchanges; for engines without MPI, the NCCL unique
// id can travel through a file every rank can read.
#pragma once

#include <specmoe/comm/bootstrap.hpp>
#include <specmoe/core/cuda_error.cuh>

#include <cuda_runtime.h>
#include <nccl.h>

#include <chrono>
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

/// @brief A bootstrap over an existing communicator (not owned): ncclAllGather through a small
/// device buffer, synchronised before returning. Setup only.
class nccl_bootstrap final : public bootstrap {
 public:
  explicit nccl_bootstrap(ncclComm_t comm) : comm_(comm) {
    SPECMOE_EXPECTS(comm != nullptr, errc::invalid_argument, "nccl_bootstrap needs a communicator");
    SPECMOE_NCCL_TRY(ncclCommUserRank(comm_, &rank_));
    SPECMOE_NCCL_TRY(ncclCommCount(comm_, &size_));
    SPECMOE_CUDA_TRY(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
  }
  nccl_bootstrap(nccl_bootstrap const&) = delete;
  nccl_bootstrap& operator=(nccl_bootstrap const&) = delete;
  ~nccl_bootstrap() override {
    if (stream_) cudaStreamDestroy(stream_);
  }
  [[nodiscard]] int rank() const override { return rank_; }
  [[nodiscard]] int size() const override { return size_; }
  [[nodiscard]] ncclComm_t comm() const noexcept { return comm_; }

  /// Stream-ordered throughout (its own stream, cudaMallocAsync/cudaFreeAsync): a process that
  /// drives several GPUs may have a peer's collective in flight, which a device-wide
  /// synchronisation (cudaFree, the legacy stream) would wait for while that peer waits for us.
  void allgather(void const* mine, std::size_t bytes, void* all) override {
    if (bytes == 0) return;
    void* buf = nullptr;
    auto const total = bytes * static_cast<std::size_t>(size_ + 1);
    SPECMOE_CUDA_TRY(cudaMallocAsync(&buf, total, stream_));
    auto* dev = static_cast<std::byte*>(buf);
    auto* own = dev + bytes * static_cast<std::size_t>(size_);
    cudaError_t err = cudaMemcpyAsync(own, mine, bytes, cudaMemcpyHostToDevice, stream_);
    ncclResult_t nr = ncclSuccess;
    if (err == cudaSuccess) nr = ncclAllGather(own, dev, bytes, ncclUint8, comm_, stream_);
    if (err == cudaSuccess && nr == ncclSuccess)
      err = cudaMemcpyAsync(all, dev, bytes * static_cast<std::size_t>(size_), cudaMemcpyDeviceToHost, stream_);
    cudaFreeAsync(buf, stream_);
    cudaError_t const synced = cudaStreamSynchronize(stream_);
    if (err == cudaSuccess) err = synced;
    SPECMOE_EXPECTS(nr == ncclSuccess, errc::comm, "ncclAllGather at setup failed on rank ", rank_, ": ",
                    ncclGetErrorString(nr), " (", ncclGetLastError(comm_), ")");
    SPECMOE_CUDA_TRY(err);
  }

 private:
  ncclComm_t comm_;
  int rank_ = 0, size_ = 1;
  cudaStream_t stream_ = nullptr;
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
