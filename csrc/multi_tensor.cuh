// Multi-tensor launcher: packs the pointers, sizes and per-tensor metadata of up to kMaxTensors
// tensors into the kernel's arguments (no host-to-device copy, so a launch never syncs and a
// captured graph holds the addresses themselves), and launches a persistent grid sized by the
// device's multiprocessor count over the table's chunks. The functor does the math; this file
// knows nothing about S-Adam.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace sadam::cuda {

constexpr int kChunkSize = 16384;  // elements per chunk: the unit of work and of probe partials
constexpr int kMaxTensors = 36;    // keeps the table (and the functor) under 4 KB of arguments
constexpr int kVecBytes = 16;      // 128-bit global accesses on the aligned path

// What a kernel needs to know about a tensor besides its pointers.
struct TensorMeta {
  uint64_t offset;      // flat index of element 0 in the full tensor (probe hash)
  const float* step;    // the step count, already incremented
  int tensor_id;        // j of the probe hash
  int row;              // statistics row of the tensor's scope
  int chunk_base;       // global index of the tensor's first chunk (probe partials)
  bool aligned;         // every pointer of the tensor is 16-byte aligned: vector path
};

template <int kDepth>
struct TensorTable {
  void* addresses[kDepth][kMaxTensors];
  int64_t sizes[kMaxTensors];
  TensorMeta meta[kMaxTensors];
  int chunk_start[kMaxTensors + 1];  // prefix sums of the tensors' chunk counts in this table
  int num_tensors;
};

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

inline bool is_aligned(const void* ptr) {
  return reinterpret_cast<uintptr_t>(ptr) % kVecBytes == 0;
}

// Each block walks the table's chunks with a grid stride; the functor prepares a tensor's
// loop-invariant values (scalars, hash key) once per tensor a block visits, not per chunk.
template <int kDepth, typename Functor>
__global__ void __launch_bounds__(Functor::kThreads, Functor::kMinBlocks)
    multi_tensor_kernel(const __grid_constant__ TensorTable<kDepth> table, const Functor functor) {
  const int total = table.chunk_start[table.num_tensors];
  int t = 0, prepared = -1;
  typename Functor::Prepared prep;
  for (int c = blockIdx.x; c < total; c += gridDim.x) {
    while (c >= table.chunk_start[t + 1]) ++t;  // c grows, so t only moves forward
    if (t != prepared) {
      prep = functor.prepare(table, t);
      prepared = t;
    }
    functor(table, t, c - table.chunk_start[t], prep);
  }
}

// Blocks that fit on one multiprocessor at once, asked of the runtime once per kernel.
template <int kDepth, typename Functor>
int resident_blocks_per_sm() {
  static const int blocks = [] {
    int n = 0;
    C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &n, multi_tensor_kernel<kDepth, Functor>, Functor::kThreads, 0));
    return n > 0 ? n : 1;
  }();
  return blocks;
}

// lists[d][i] is tensor i of list d (an undefined tensor leaves a null pointer). Tensors with
// no elements are skipped. meta[i].aligned is set here from the tensor's own pointers.
template <int kDepth, typename Functor>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists,
                        std::vector<TensorMeta> meta, const Functor& functor) {
  const size_t n = meta.size();
  if (n == 0) return;
  const at::Tensor& first = lists[1][0];  // the gradients are always present
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const int max_grid = at::cuda::getCurrentDeviceProperties()->multiProcessorCount *
                       resident_blocks_per_sm<kDepth, Functor>();

  TensorTable<kDepth> table;
  table.num_tensors = 0;
  table.chunk_start[0] = 0;
  auto launch = [&] {
    const int chunks = table.chunk_start[table.num_tensors];
    if (chunks == 0) return;
    multi_tensor_kernel<kDepth><<<std::min(chunks, max_grid), Functor::kThreads, 0, stream>>>(
        table, functor);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
    table.num_tensors = 0;
  };
  for (size_t t = 0; t < n; ++t) {
    const int64_t numel = lists[1][t].numel();
    if (numel == 0) continue;
    const int slot = table.num_tensors;
    bool aligned = true;
    for (int d = 0; d < kDepth; ++d) {
      void* ptr = lists[d][t].defined() ? lists[d][t].data_ptr() : nullptr;
      table.addresses[d][slot] = ptr;
      aligned = aligned && (ptr == nullptr || is_aligned(ptr));
    }
    table.sizes[slot] = numel;
    table.meta[slot] = meta[t];
    table.meta[slot].aligned = aligned;
    table.chunk_start[slot + 1] = table.chunk_start[slot] + static_cast<int>(chunks_of(numel));
    table.num_tensors = slot + 1;
    if (table.num_tensors == kMaxTensors) launch();
  }
  launch();
}

}  // namespace sadam::cuda
