// What the CPU op driver (csrc/cpu_kernels.cpp) and the vector kernel (csrc/cpu/kernel.cpp,
// compiled once per CPU capability) share: the per-tensor job, the chunk function type and the
// fixed layout every capability follows, so results are bit-identical across capabilities and
// thread counts.
#pragma once

#include <c10/core/ScalarType.h>

#include <cstdint>

#include "sadam_math.h"

namespace sadam {

constexpr int64_t kChunk = 1 << 15;   // elements per parallel task (fixed: thread-independent)
constexpr int kTile = 1024;           // elements whose probe sums stay in fp32 registers
constexpr int kLanes = 16;            // fp32 accumulation lanes: element j of a tile -> lane j % 16
constexpr int kStep = 2 * kLanes;     // elements per vector-loop step; tile tails run scalar
constexpr int kPartial = kMaxProbes;  // per chunk: d_0 .. d_31 (float64)

struct TensorJob {
  void* param;
  const void* grad;
  void* exp_avg;
  void* exp_avg_sq;
  void* max_exp_avg_sq;
  int64_t numel;
  uint64_t offset;  // flat index of element 0 in the full tensor
  uint32_t key;     // probe hash key of (seed, epoch, tensor id)
  int row;
  TensorScalars scalars;
};

// Runs elements [begin, end) of one tensor; with the probe on, writes d_0 .. d_(k-1) of those
// elements to partial (kPartial doubles, zeroed by the caller).
using ChunkFn = void (*)(const TensorJob&, int64_t begin, int64_t end, float gmul, int k,
                         double* partial);

// One definition per capability the build contains (csrc/cpu/kernel.cpp).
#define SADAM_DECLARE_CPU_KERNEL(capability)                                                \
  namespace capability {                                                                    \
  ChunkFn pick_chunk_kernel(c10::ScalarType param, c10::ScalarType state, bool update,      \
                            bool probe, bool amsgrad);                                      \
  }
SADAM_DECLARE_CPU_KERNEL(DEFAULT)
SADAM_DECLARE_CPU_KERNEL(AVX2)
SADAM_DECLARE_CPU_KERNEL(AVX512)
#undef SADAM_DECLARE_CPU_KERNEL

}  // namespace sadam
