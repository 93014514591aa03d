// CUDA kernels of the native backend. The update kernel is a persistent grid over multi-tensor
// tables (multi_tensor.cuh); each block handles 16K-element chunks with 128-bit accesses where a
// tensor's pointers allow them, and with probes on writes each chunk's k probe partials. A
// second kernel sums each statistics row's partials (one block per row and probe, a fixed-order
// tree, so the result does not depend on the grid), and the finalize kernel folds d into the
// statistics, one thread per row. Nothing here reads a device value on the host.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "multi_tensor.cuh"
#include "sadam_math.h"
#include "validation.h"

namespace sadam::cuda {
namespace {

constexpr int kDepth = 5;  // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq
constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;

// The probe sums are register arrays sized by a bucket of the probe count, so probe="off" and
// small k do not pay for k = 32 (0 = no probe).
constexpr int probe_bucket(int k, bool probe) {
  return !probe ? 0 : k <= 8 ? 8 : k <= 16 ? 16 : 32;
}

struct StepArgs {
  const float* stats;
  const double* hyper;      // device [lr, beta1, beta2, weight_decay, damping], or null:
  double hyper_host[kNumHyper];  // the same values as numbers known on the host
  const float* grad_scale;  // null: none
  const float* found_inf;   // null: none
  float* partials;          // (total chunks, k) or null without probes
  int* chunk_rows;          // statistics row of each chunk (chunks are ordered by row)
  float eps;
  int k, width, window;
  uint32_t seed;
  bool maximize, damped;
};

// Aligned 128-bit loads and stores of kN values of type T, converted to and from float.
template <typename T, int kN>
struct Vec {
  static_assert(sizeof(T) * kN % kVecBytes == 0, "whole 16-byte words");
  static constexpr int kWords = sizeof(T) * kN / kVecBytes;
  union {
    uint4 words[kWords];
    T values[kN];
  };
  __device__ __forceinline__ Vec() {}

  __device__ __forceinline__ void load(const T* ptr) {
#pragma unroll
    for (int w = 0; w < kWords; ++w) words[w] = reinterpret_cast<const uint4*>(ptr)[w];
  }
  __device__ __forceinline__ void store(T* ptr) const {
#pragma unroll
    for (int w = 0; w < kWords; ++w) reinterpret_cast<uint4*>(ptr)[w] = words[w];
  }
};

// The chunk functor of the update (kUpdate) or of the probe pass alone. P: parameter and
// gradient type, S: moment type, kBucket: probe accumulators (0: no probe).
template <typename P, typename S, int kBucket, bool kUpdate, bool kAmsgrad>
struct StepFunctor {
  static constexpr int kThreads = sadam::cuda::kThreads;
  // 16 bytes of the narrowest stream per thread and iteration (4 fp32 or 8 bf16 elements)
  static constexpr int kVecN = kVecBytes / (sizeof(P) < sizeof(S) ? sizeof(P) : sizeof(S));
  // Resident blocks of 256 threads per SM that the register budget must allow: 4 (64
  // registers, half the SM's threads) up to 8 probes, fewer as the probe sums grow or amsgrad
  // adds a stream. Tighter caps spill (-Xptxas -v: 48 registers spill even without probes,
  // around the calls of the IEEE division and square-root slow paths). Each thread has four
  // 16-byte loads in flight, so half occupancy keeps 64 KB per SM in flight, more than the
  // memory latency needs.
  static constexpr int kMinBlocks =
      kBucket <= 8 ? (kAmsgrad ? 3 : 4) : kBucket <= 16 ? 3 : 2;

  StepArgs a;

  struct Prepared {
    TensorScalars s;
    uint32_t key;
    float gmul;
    bool write;
  };

  __device__ __forceinline__ Prepared prepare(const TensorTable<kDepth>& table, int ti) const {
    const TensorMeta& meta = table.meta[ti];
    const float* row = a.stats + static_cast<int64_t>(meta.row) * a.width;
    Prepared r{};
    r.gmul = a.maximize ? -1.0f : 1.0f;
    if (a.grad_scale != nullptr) r.gmul /= *a.grad_scale;
    r.write = kUpdate && !(a.found_inf != nullptr && *a.found_inf > 0.0f);
    if (r.write) {
      double h[kNumHyper];
#pragma unroll
      for (int i = 0; i < kNumHyper; ++i) h[i] = a.hyper != nullptr ? a.hyper[i] : a.hyper_host[i];
      r.s = tensor_scalars(h, a.eps, *meta.step, row[rho_col(a.k)], a.damped);
    }
    if (kBucket > 0)
      r.key = probe_key(a.seed, effective_epoch(row, a.k, a.window),
                        static_cast<uint32_t>(meta.tensor_id));
    return r;
  }

  // One element: the probe sums of g and (with kUpdate) the AdamW update of p, m, v.
  __device__ __forceinline__ void element(float g, uint32_t index, uint32_t high, float (&acc)[
      kBucket > 0 ? kBucket : 1], const Prepared& r, float& p, float& m, float& v,
      float& vmax) const {
    if (kBucket > 0) {
      const uint32_t x = probe_mix(index ^ high);
#pragma unroll
      for (int q = 0; q < kBucket; ++q) acc[q] += ((x >> q) & 1u) ? g : -g;
    }
    if (kUpdate) p = adam_math<kAmsgrad>(p, g, m, v, vmax, r.s);
  }

  __device__ void operator()(const TensorTable<kDepth>& table, int ti, int chunk,
                             const Prepared& r) const {
    const TensorMeta& meta = table.meta[ti];
    const int64_t start = static_cast<int64_t>(chunk) * kChunkSize;
    const int len = static_cast<int>(min(static_cast<int64_t>(kChunkSize),
                                         table.sizes[ti] - start));
    P* param = static_cast<P*>(table.addresses[0][ti]) + start;
    const P* grad = static_cast<const P*>(table.addresses[1][ti]) + start;
    S* m_ptr = static_cast<S*>(table.addresses[2][ti]) + start;
    S* v_ptr = static_cast<S*>(table.addresses[3][ti]) + start;
    S* x_ptr = static_cast<S*>(table.addresses[4][ti]) + start;
    // Hash index of element i: lo32 = base + i; the high word is that of the chunk's first
    // element unless lo32 wraps inside the chunk (only at multiples of 2^32 elements).
    const uint64_t base = meta.offset + static_cast<uint64_t>(start);
    const uint32_t base_lo = static_cast<uint32_t>(base);
    const uint32_t high0 = probe_high(static_cast<uint32_t>(base >> 32), r.key);
    const uint32_t high1 = probe_high(static_cast<uint32_t>(base >> 32) + 1u, r.key);

    float acc[kBucket > 0 ? kBucket : 1];
#pragma unroll
    for (int q = 0; q < (kBucket > 0 ? kBucket : 1); ++q) acc[q] = 0.0f;
    const bool update = kUpdate && r.write;

    int scalar_from = 0;
    if (meta.aligned) {
      const int nvec = len / kVecN;
#pragma unroll 1  // four 16-byte loads per trip are enough in flight; unrolling only adds registers
      for (int i = threadIdx.x; i < nvec; i += kThreads) {
        const int e0 = i * kVecN;
        Vec<P, kVecN> gv, pv;
        Vec<S, kVecN> mv, vv, xv;
        gv.load(grad + e0);
        if (update) {
          pv.load(param + e0);
          mv.load(m_ptr + e0);
          vv.load(v_ptr + e0);
          if (kAmsgrad) xv.load(x_ptr + e0);
        }
#pragma unroll
        for (int j = 0; j < kVecN; ++j) {
          const uint32_t lo = base_lo + static_cast<uint32_t>(e0 + j);
          float p = 0.0f, m = 0.0f, v = 0.0f, x = 0.0f;
          if (update) {
            p = static_cast<float>(pv.values[j]);
            m = static_cast<float>(mv.values[j]);
            v = static_cast<float>(vv.values[j]);
            if (kAmsgrad) x = static_cast<float>(xv.values[j]);
          }
          element(static_cast<float>(gv.values[j]) * r.gmul, lo, lo < base_lo ? high1 : high0,
                  acc, r, p, m, v, x);
          if (update) {
            pv.values[j] = static_cast<P>(p);
            mv.values[j] = static_cast<S>(m);
            vv.values[j] = static_cast<S>(v);
            if (kAmsgrad) xv.values[j] = static_cast<S>(x);
          }
        }
        if (update) {
          pv.store(param + e0);
          mv.store(m_ptr + e0);
          vv.store(v_ptr + e0);
          if (kAmsgrad) xv.store(x_ptr + e0);
        }
      }
      scalar_from = nvec * kVecN;
    }
    // The unaligned tensors, and the tail of an aligned chunk: one element at a time.
#pragma unroll 1
    for (int e = scalar_from + threadIdx.x; e < len; e += kThreads) {
      const uint32_t lo = base_lo + static_cast<uint32_t>(e);
      float p = 0.0f, m = 0.0f, v = 0.0f, x = 0.0f;
      if (update) {
        p = static_cast<float>(param[e]);
        m = static_cast<float>(m_ptr[e]);
        v = static_cast<float>(v_ptr[e]);
        if (kAmsgrad) x = static_cast<float>(x_ptr[e]);
      }
      element(static_cast<float>(grad[e]) * r.gmul, lo, lo < base_lo ? high1 : high0, acc, r, p,
              m, v, x);
      if (update) {
        param[e] = static_cast<P>(p);
        m_ptr[e] = static_cast<S>(m);
        v_ptr[e] = static_cast<S>(v);
        if (kAmsgrad) x_ptr[e] = static_cast<S>(x);
      }
    }
    if (kBucket > 0) write_partials(acc, meta.chunk_base + chunk, meta.row);
  }

  // Block sum of each probe's accumulator in a fixed order: warp shuffles, then warps in order.
  __device__ void write_partials(float (&acc)[kBucket > 0 ? kBucket : 1], int global_chunk,
                                 int row) const {
    __shared__ float warp_sums[kWarps][kBucket > 0 ? kBucket : 1];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < kBucket; ++q) {
      float v = acc[q];
#pragma unroll
      for (int off = 16; off > 0; off /= 2) v += __shfl_xor_sync(0xffffffffu, v, off);
      if (lane == 0) warp_sums[warp][q] = v;
    }
    __syncthreads();
    if (threadIdx.x < a.k) {
      float sum = 0.0f;
#pragma unroll
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
      a.partials[static_cast<int64_t>(global_chunk) * a.k + threadIdx.x] = sum;
    }
    if (threadIdx.x == 0) a.chunk_rows[global_chunk] = row;
    __syncthreads();  // warp_sums is rewritten by the next chunk
  }
};

constexpr int kReduceThreads = 128;

// First chunk whose row is >= row (chunk_rows is sorted).
__device__ int lower_bound(const int* chunk_rows, int n, int row) {
  int lo = 0, hi = n;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (chunk_rows[mid] < row) lo = mid + 1; else hi = mid;
  }
  return lo;
}

// d[row, q] = sum of partials[c, q] over the chunks c of `row`: one block per (row, q), each
// thread a fixed strided subset of the chunks in float64, then a fixed-order tree.
__global__ void __launch_bounds__(kReduceThreads) reduce_partials_kernel(
    const float* partials, const int* chunk_rows, int total_chunks, int k, float* d) {
  const int row = blockIdx.x, q = blockIdx.y;
  const int begin = lower_bound(chunk_rows, total_chunks, row);
  const int end = lower_bound(chunk_rows, total_chunks, row + 1);
  double sum = 0.0;
  for (int c = begin + threadIdx.x; c < end; c += kReduceThreads)
    sum += partials[static_cast<int64_t>(c) * k + q];
#pragma unroll
  for (int off = 16; off > 0; off /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  __shared__ double warp_sums[kReduceThreads / 32];
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    double total = 0.0;
#pragma unroll
    for (int w = 0; w < kReduceThreads / 32; ++w) total += warp_sums[w];
    d[static_cast<int64_t>(row) * k + q] = static_cast<float>(total);
  }
}

constexpr int kMaxRows = 256;
struct RowTable {
  int rows[kMaxRows];
  int count;
};

__global__ void finalize_kernel(float* stats, const float* d, const double* hyper,
                                double damping_host, const float* found_inf, RowTable table,
                                int k, int width, float beta, float one_minus_beta, int window,
                                int lag) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= table.count || (found_inf != nullptr && *found_inf > 0.0f)) return;
  const int row = table.rows[i];
  const double damping = hyper != nullptr ? hyper[kDamping] : damping_host;
  finalize_row(stats + static_cast<int64_t>(row) * width, d + static_cast<int64_t>(row) * k, k,
               beta, one_minus_beta, window, static_cast<float>(damping), lag);
}

const float* optional_ptr(const std::optional<at::Tensor>& t, const at::Tensor& like,
                          std::vector<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  keep.push_back(t->to(like.device(), at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

// The hyperparameters as the kernels take them: a device pointer, or (a CPU tensor: numbers the
// host knows) values passed as kernel arguments, so that building them never syncs.
const double* hyper_args(const at::Tensor& hyper, double* host) {
  if (hyper.is_cuda()) return hyper.data_ptr<double>();
  const double* h = hyper.data_ptr<double>();
  std::copy(h, h + kNumHyper, host);
  return nullptr;
}

template <typename F>
void dispatch_param(at::ScalarType param, F&& f) {
  switch (param) {
    case at::kFloat: return f(float{});
    case at::kBFloat16: return f(at::BFloat16{});
    case at::kHalf: return f(at::Half{});
    default: TORCH_CHECK(false, "sadam: params must be float32, bfloat16 or float16, got ", param);
  }
}

template <typename F>
void dispatch_state(at::ScalarType state, F&& f) {
  if (state == at::kFloat) return f(float{});
  TORCH_CHECK(state == at::kBFloat16, "sadam: exp_avg must be float32 or bfloat16, got ", state);
  return f(at::BFloat16{});
}

template <int kBucket, typename P, typename S>
void launch_step(const std::vector<std::vector<at::Tensor>>& lists,
                 const std::vector<TensorMeta>& meta, const StepArgs& a, bool update,
                 bool amsgrad) {
  if constexpr (kBucket > 0) {  // the probe pass alone always probes
    if (!update)
      return multi_tensor_apply<kDepth>(lists, meta, StepFunctor<P, P, kBucket, false, false>{a});
  }
  if (amsgrad)
    multi_tensor_apply<kDepth>(lists, meta, StepFunctor<P, S, kBucket, true, true>{a});
  else
    multi_tensor_apply<kDepth>(lists, meta, StepFunctor<P, S, kBucket, true, false>{a});
}

template <typename P, typename S>
void launch_bucket(int bucket, const std::vector<std::vector<at::Tensor>>& lists,
                   const std::vector<TensorMeta>& meta, const StepArgs& a, bool update,
                   bool amsgrad) {
  switch (bucket) {
    case 0: return launch_step<0, P, S>(lists, meta, a, update, amsgrad);
    case 8: return launch_step<8, P, S>(lists, meta, a, update, amsgrad);
    case 16: return launch_step<16, P, S>(lists, meta, a, update, amsgrad);
    default: return launch_step<32, P, S>(lists, meta, a, update, amsgrad);
  }
}

std::vector<at::Tensor> to_vector(at::TensorList list, size_t n) {
  std::vector<at::Tensor> out(list.begin(), list.end());
  out.resize(n);  // absent lists (no amsgrad, probe only) become undefined tensors
  return out;
}

// Global chunk index of each tensor's first chunk, the tensors ordered by statistics row, so that
// the chunks of a row are one contiguous range of the partials.
std::vector<int> chunk_bases_by_row(at::TensorList grads, at::IntArrayRef scope_rows,
                                    int& total_chunks) {
  const size_t n = grads.size();
  std::vector<size_t> order(n);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](size_t x, size_t y) { return scope_rows[x] < scope_rows[y]; });
  std::vector<int> base(n);
  total_chunks = 0;
  for (size_t i : order) {
    base[i] = total_chunks;
    total_chunks += static_cast<int>(chunks_of(grads[i].numel()));
  }
  return base;
}

// The shared path of update and directional: launches the step kernels, returns d.
at::Tensor run_group(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                     at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                     at::TensorList steps, const at::Tensor& stats, const at::Tensor* hyper,
                     const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, at::IntArrayRef scope_rows,
                     at::IntArrayRef tensor_ids, at::IntArrayRef offsets, double eps, int k,
                     int64_t window, int64_t seed, bool amsgrad, bool maximize, bool damped,
                     bool update, bool probe) {
  const size_t n = grads.size();
  const c10::cuda::CUDAGuard guard(stats.device());
  std::vector<at::Tensor> keep;
  StepArgs a{};
  a.stats = stats.data_ptr<float>();
  a.hyper = hyper ? hyper_args(*hyper, a.hyper_host) : nullptr;
  a.grad_scale = optional_ptr(grad_scale, stats, keep);
  const float* inf = optional_ptr(found_inf, stats, keep);
  a.found_inf = inf;
  a.eps = static_cast<float>(eps);
  a.k = k;
  a.width = static_cast<int>(stats.size(1));
  a.window = static_cast<int>(window);
  a.seed = static_cast<uint32_t>(seed);
  a.maximize = maximize;
  a.damped = damped;

  if (update) {  // the step counts first (skipped with found_inf), the kernel reads them
    std::vector<at::Tensor> step_list(steps.begin(), steps.end());
    if (inf != nullptr)
      at::_foreach_add_(step_list, 1.0f - (keep.back() > 0).to(at::kFloat));
    else
      at::_foreach_add_(step_list, 1.0);
  }
  int total_chunks = 0;
  const std::vector<int> bases = chunk_bases_by_row(grads, scope_rows, total_chunks);
  std::vector<TensorMeta> meta(n);
  for (size_t i = 0; i < n; ++i)
    meta[i] = TensorMeta{static_cast<uint64_t>(offsets[i]),
                         update ? steps[i].data_ptr<float>() : nullptr,
                         static_cast<int>(tensor_ids[i]), static_cast<int>(scope_rows[i]),
                         bases[i], false};
  const int64_t num_scopes = stats.size(0);
  at::Tensor partials, chunk_rows;
  if (probe && total_chunks > 0) {
    partials = at::empty({total_chunks, k}, stats.options());
    chunk_rows = at::empty({total_chunks}, stats.options().dtype(at::kInt));
    a.partials = partials.data_ptr<float>();
    a.chunk_rows = chunk_rows.data_ptr<int>();
  }
  if (n > 0 && (update || probe)) {
    const std::vector<std::vector<at::Tensor>> lists{
        to_vector(params, n), to_vector(grads, n), to_vector(exp_avgs, n),
        to_vector(exp_avg_sqs, n), to_vector(max_exp_avg_sqs, n)};
    const at::ScalarType state = exp_avgs.empty() ? at::kFloat : exp_avgs[0].scalar_type();
    const int bucket = probe_bucket(k, probe);
    dispatch_param(grads[0].scalar_type(), [&](auto p) {
      using P = decltype(p);
      if (!update) return launch_bucket<P, P>(bucket, lists, meta, a, false, false);
      dispatch_state(state, [&](auto s) {
        launch_bucket<P, decltype(s)>(bucket, lists, meta, a, true, amsgrad);
      });
    });
  }
  if (!probe) return at::empty({0, k}, stats.options());
  if (total_chunks == 0) return at::zeros({num_scopes, k}, stats.options());
  at::Tensor d = at::empty({num_scopes, k}, stats.options());
  reduce_partials_kernel<<<dim3(static_cast<unsigned>(num_scopes), static_cast<unsigned>(k)),
                           kReduceThreads, 0, at::cuda::getCurrentCUDAStream()>>>(
      a.partials, a.chunk_rows, total_chunks, k, d.data_ptr<float>());
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return d;
}

at::Tensor update_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                       at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                       at::TensorList steps, const at::Tensor& stats, const at::Tensor& hyper,
                       const std::optional<at::Tensor>& grad_scale,
                       const std::optional<at::Tensor>& found_inf, at::IntArrayRef scope_rows,
                       at::IntArrayRef tensor_ids, at::IntArrayRef offsets, double eps,
                       int64_t probes, int64_t window, int64_t seed, bool amsgrad, bool maximize,
                       bool damped, bool emit_probe) {
  check_update_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, stats, hyper,
                    scope_rows, tensor_ids, offsets, probes, amsgrad, at::kCUDA);
  return run_group(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, stats, &hyper,
                   grad_scale, found_inf, scope_rows, tensor_ids, offsets, eps,
                   static_cast<int>(probes), window, seed, amsgrad, maximize, damped, true,
                   emit_probe);
}

at::Tensor directional_cuda(at::TensorList grads, const at::Tensor& stats,
                            const std::optional<at::Tensor>& grad_scale,
                            at::IntArrayRef scope_rows, at::IntArrayRef tensor_ids,
                            at::IntArrayRef offsets, int64_t probes, int64_t window, int64_t seed,
                            bool maximize) {
  check_probe_args(grads, stats, scope_rows, tensor_ids, offsets, probes, at::kCUDA);
  return run_group({}, grads, {}, {}, {}, {}, stats, nullptr, grad_scale, std::nullopt,
                   scope_rows, tensor_ids, offsets, 0.0, static_cast<int>(probes), window, seed,
                   false, maximize, false, false, true);
}

void finalize_cuda(const at::Tensor& stats, const at::Tensor& d, const at::Tensor& hyper,
                   const std::optional<at::Tensor>& found_inf, at::IntArrayRef rows,
                   double probe_beta, int64_t window, int64_t lag) {
  check_finalize_args(stats, d, hyper, rows, at::kCUDA);
  const c10::cuda::CUDAGuard guard(stats.device());
  std::vector<at::Tensor> keep;
  const float* inf = optional_ptr(found_inf, stats, keep);
  const at::Tensor dc = d.contiguous();
  double host[kNumHyper] = {};
  const double* dev = hyper_args(hyper, host);
  for (size_t begin = 0; begin < rows.size(); begin += kMaxRows) {
    RowTable table{};
    table.count = static_cast<int>(std::min<size_t>(kMaxRows, rows.size() - begin));
    for (int i = 0; i < table.count; ++i) table.rows[i] = static_cast<int>(rows[begin + i]);
    finalize_kernel<<<1, kMaxRows, 0, at::cuda::getCurrentCUDAStream()>>>(
        stats.data_ptr<float>(), dc.data_ptr<float>(), dev, host[kDamping], inf, table,
        static_cast<int>(d.size(1)), static_cast<int>(stats.size(1)),
        static_cast<float>(probe_beta), static_cast<float>(1.0 - probe_beta),
        static_cast<int>(window), static_cast<int>(lag));
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
}

}  // namespace
}  // namespace sadam::cuda

TORCH_LIBRARY_IMPL(sadam, CUDA, m) {
  m.impl("native_update", &sadam::cuda::update_cuda);
  m.impl("native_directional", &sadam::cuda::directional_cuda);
  m.impl("native_finalize", &sadam::cuda::finalize_cuda);
}
