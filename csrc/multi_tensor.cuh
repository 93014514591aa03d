// Multi-tensor launcher: packs the pointers, sizes and per-tensor metadata of up to kMaxTensors
// tensors and a block -> (tensor, chunk) map into the kernel's arguments, and launches one
// kernel per table. The functor does the math; this file knows nothing about S-Adam.
#pragma once

#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>

#include <vector>

namespace sadam::cuda {

constexpr int kChunkSize = 65536;  // elements per block
constexpr int kThreads = 512;
constexpr int kMaxTensors = 24;
constexpr int kMaxBlocks = 320;  // keeps the table under the 4 KB kernel-argument limit

// What a kernel needs to know about a tensor besides its pointers.
struct TensorMeta {
  uint64_t offset;      // flat index of element 0 in the full tensor (probe hash)
  const float* step;    // the step count, already incremented
  int tensor_id;        // j of the probe hash
  int row;              // statistics row of the tensor's scope
  int chunk_base;       // global index of the tensor's first chunk (probe partials)
};

template <int kDepth>
struct TensorTable {
  void* addresses[kDepth][kMaxTensors];
  int64_t sizes[kMaxTensors];
  TensorMeta meta[kMaxTensors];
  unsigned char block_to_tensor[kMaxBlocks];
  int block_to_chunk[kMaxBlocks];
};

template <int kDepth, typename Functor>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(TensorTable<kDepth> table,
                                                                Functor functor) {
  functor(table, blockIdx.x);
}

inline int64_t chunks_of(int64_t numel) { return (numel + kChunkSize - 1) / kChunkSize; }

// lists[d][i] is tensor i of list d (an undefined tensor leaves a null pointer).
template <int kDepth, typename Functor>
void multi_tensor_apply(const std::vector<std::vector<at::Tensor>>& lists,
                        const std::vector<TensorMeta>& meta, const Functor& functor) {
  const size_t n = meta.size();
  if (n == 0) return;
  const at::Tensor& first = lists[1][0];  // the gradients are always present
  const c10::cuda::CUDAGuard guard(first.device());
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  int last = -1;
  for (size_t t = 0; t < n; ++t)
    if (lists[1][t].numel() > 0) last = static_cast<int>(t);

  TensorTable<kDepth> table;
  int loc_tensor = 0, loc_block = 0;
  for (int t = 0; t <= last; ++t) {
    const int64_t numel = lists[1][t].numel();
    if (numel == 0) continue;
    for (int d = 0; d < kDepth; ++d)
      table.addresses[d][loc_tensor] = lists[d][t].defined() ? lists[d][t].data_ptr() : nullptr;
    table.sizes[loc_tensor] = numel;
    table.meta[loc_tensor] = meta[t];
    ++loc_tensor;
    const int64_t chunks = chunks_of(numel);
    for (int64_t c = 0; c < chunks; ++c) {
      table.block_to_tensor[loc_block] = static_cast<unsigned char>(loc_tensor - 1);
      table.block_to_chunk[loc_block] = static_cast<int>(c);
      ++loc_block;
      const bool last_chunk = c == chunks - 1;
      if ((loc_tensor == kMaxTensors && last_chunk) || loc_block == kMaxBlocks ||
          (t == last && last_chunk)) {
        multi_tensor_kernel<kDepth><<<loc_block, kThreads, 0, stream>>>(table, functor);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        loc_block = 0;
        if (last_chunk) {
          loc_tensor = 0;
        } else {  // the tensor continues in the next table, in slot 0
          for (int d = 0; d < kDepth; ++d) table.addresses[d][0] = table.addresses[d][loc_tensor - 1];
          table.sizes[0] = table.sizes[loc_tensor - 1];
          table.meta[0] = table.meta[loc_tensor - 1];
          loc_tensor = 1;
        }
      }
    }
  }
}

}  // namespace sadam::cuda
