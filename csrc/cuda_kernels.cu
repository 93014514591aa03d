// CUDA kernels of the native backend. The update kernel runs over multi-tensor tables (one
// block per chunk); with probes on, each block also writes its k probe partials and its row.
// A small kernel then sums the partials of each row in chunk order (deterministic, no float
// atomics), and the finalize kernel folds d into the statistics, one thread per row.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <vector>

#include "multi_tensor.cuh"
#include "sadam_math.h"
#include "validation.h"

namespace sadam::cuda {
namespace {

constexpr int kDepth = 5;  // param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq
constexpr int kWarps = kThreads / 32;

struct StepArgs {
  const float* stats;
  const double* hyper;
  const float* grad_scale;  // null: none
  const float* found_inf;   // null: none
  float* partials;          // (total chunks, k) or null without probes
  int* chunk_rows;          // statistics row of each chunk
  float eps;
  int k, width, window;
  uint32_t seed;
  bool maximize, damped, amsgrad, update;
};

template <typename P, typename S>
struct StepFunctor {
  StepArgs a;

  __device__ void operator()(const TensorTable<kDepth>& table, int block) const {
    const int ti = table.block_to_tensor[block];
    const int chunk = table.block_to_chunk[block];
    const TensorMeta& meta = table.meta[ti];
    const int64_t start = static_cast<int64_t>(chunk) * kChunkSize;
    const int64_t len = min(static_cast<int64_t>(kChunkSize), table.sizes[ti] - start);
    P* param = static_cast<P*>(table.addresses[0][ti]);
    const P* grad = static_cast<const P*>(table.addresses[1][ti]);
    S* m_ptr = static_cast<S*>(table.addresses[2][ti]);
    S* v_ptr = static_cast<S*>(table.addresses[3][ti]);
    S* vmax_ptr = static_cast<S*>(table.addresses[4][ti]);
    const float* row = a.stats + static_cast<int64_t>(meta.row) * a.width;

    float gmul = a.maximize ? -1.0f : 1.0f;
    if (a.grad_scale != nullptr) gmul /= *a.grad_scale;
    const bool write = a.update && !(a.found_inf != nullptr && *a.found_inf > 0.0f);
    TensorScalars s{};
    if (write) s = tensor_scalars(a.hyper, a.eps, *meta.step, row[rho_col(a.k)], a.damped);
    const bool probe = a.partials != nullptr;
    const uint32_t key = probe_key(a.seed, effective_epoch(row, a.k, a.window),
                                   static_cast<uint32_t>(meta.tensor_id));

    float acc[kMaxProbes];
#pragma unroll
    for (int q = 0; q < kMaxProbes; ++q) acc[q] = 0.0f;

    for (int64_t i = threadIdx.x; i < len; i += kThreads) {
      const int64_t e = start + i;
      const float g = static_cast<float>(grad[e]) * gmul;
      if (probe) {
        const uint32_t x = probe_hash(meta.offset + static_cast<uint64_t>(e), key);
#pragma unroll
        for (int q = 0; q < kMaxProbes; ++q)
          if (q < a.k) acc[q] += ((x >> q) & 1u) ? g : -g;
      }
      if (write) {
        float m = static_cast<float>(m_ptr[e]);
        float v = static_cast<float>(v_ptr[e]);
        float vmax = a.amsgrad ? static_cast<float>(vmax_ptr[e]) : 0.0f;
        const float p = static_cast<float>(param[e]);
        const float out = a.amsgrad ? adam_math<true>(p, g, m, v, vmax, s)
                                    : adam_math<false>(p, g, m, v, vmax, s);
        param[e] = static_cast<P>(out);
        m_ptr[e] = static_cast<S>(m);
        v_ptr[e] = static_cast<S>(v);
        if (a.amsgrad) vmax_ptr[e] = static_cast<S>(vmax);
      }
    }
    if (probe) write_partials(acc, meta.chunk_base + chunk, meta.row);
  }

  // Block sum of each probe's accumulator in a fixed order: warp shuffles, then warps in order.
  __device__ void write_partials(float* acc, int global_chunk, int row) const {
    __shared__ float warp_sums[kWarps][kMaxProbes];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
#pragma unroll
    for (int q = 0; q < kMaxProbes; ++q) {
      if (q < a.k) {
        float v = acc[q];
        for (int off = 16; off > 0; off /= 2) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) warp_sums[warp][q] = v;
      }
    }
    __syncthreads();
    if (threadIdx.x < a.k) {
      float sum = 0.0f;
      for (int w = 0; w < kWarps; ++w) sum += warp_sums[w][threadIdx.x];
      a.partials[static_cast<int64_t>(global_chunk) * a.k + threadIdx.x] = sum;
    }
    if (threadIdx.x == 0) a.chunk_rows[global_chunk] = row;
  }
};

// d[row, q] = sum over the chunks of `row`, in chunk order, of partials[chunk, q].
__global__ void reduce_partials_kernel(const float* partials, const int* chunk_rows,
                                       int total_chunks, int k, int num_scopes, float* d) {
  const int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= num_scopes * k) return;
  const int row = idx / k, q = idx % k;
  double sum = 0.0;
  for (int c = 0; c < total_chunks; ++c)
    if (chunk_rows[c] == row) sum += partials[static_cast<int64_t>(c) * k + q];
  d[idx] = static_cast<float>(sum);
}

constexpr int kMaxRows = 256;
struct RowTable {
  int rows[kMaxRows];
  int count;
};

__global__ void finalize_kernel(float* stats, const float* d, const double* hyper,
                                const float* found_inf, RowTable table, int k, int width,
                                float beta, float one_minus_beta, int window, int lag) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= table.count || (found_inf != nullptr && *found_inf > 0.0f)) return;
  const int row = table.rows[i];
  finalize_row(stats + static_cast<int64_t>(row) * width, d + static_cast<int64_t>(row) * k, k,
               beta, one_minus_beta, window, static_cast<float>(hyper[kDamping]), lag);
}

const float* optional_ptr(const std::optional<at::Tensor>& t, const at::Tensor& like,
                          std::vector<at::Tensor>& keep) {
  if (!t.has_value()) return nullptr;
  keep.push_back(t->to(like.device(), at::kFloat).contiguous());
  return keep.back().data_ptr<float>();
}

template <typename F>
void dispatch_types(at::ScalarType param, at::ScalarType state, F&& f) {
  auto with_state = [&](auto p) {
    using P = decltype(p);
    if (state == at::kFloat) return f(P{}, float{});
    TORCH_CHECK(state == at::kBFloat16, "sadam: exp_avg must be float32 or bfloat16, got ", state);
    return f(P{}, at::BFloat16{});
  };
  switch (param) {
    case at::kFloat: return with_state(float{});
    case at::kBFloat16: return with_state(at::BFloat16{});
    case at::kHalf: return with_state(at::Half{});
    default: TORCH_CHECK(false, "sadam: params must be float32, bfloat16 or float16, got ", param);
  }
}

std::vector<at::Tensor> to_vector(at::TensorList list, size_t n) {
  std::vector<at::Tensor> out(list.begin(), list.end());
  out.resize(n);  // absent lists (no amsgrad, probe only) become undefined tensors
  return out;
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
  a.hyper = hyper ? hyper->data_ptr<double>() : nullptr;
  a.grad_scale = optional_ptr(grad_scale, stats, keep);
  a.found_inf = optional_ptr(found_inf, stats, keep);
  a.eps = static_cast<float>(eps);
  a.k = k;
  a.width = static_cast<int>(stats.size(1));
  a.window = static_cast<int>(window);
  a.seed = static_cast<uint32_t>(seed);
  a.maximize = maximize;
  a.damped = damped;
  a.amsgrad = amsgrad;
  a.update = update;

  if (update) {  // the step counts first (skipped with found_inf), the kernel reads them
    std::vector<at::Tensor> step_list(steps.begin(), steps.end());
    if (a.found_inf != nullptr)
      at::_foreach_add_(step_list, 1.0f - (keep.back() > 0).to(at::kFloat));
    else
      at::_foreach_add_(step_list, 1.0);
  }
  std::vector<TensorMeta> meta(n);
  int total_chunks = 0;
  for (size_t i = 0; i < n; ++i) {
    meta[i] = TensorMeta{static_cast<uint64_t>(offsets[i]),
                         update ? steps[i].data_ptr<float>() : nullptr,
                         static_cast<int>(tensor_ids[i]), static_cast<int>(scope_rows[i]),
                         total_chunks};
    total_chunks += static_cast<int>(chunks_of(grads[i].numel()));
  }
  const int64_t num_scopes = stats.size(0);
  at::Tensor d = at::zeros({probe ? num_scopes : 0, k}, stats.options());
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
    dispatch_types(grads[0].scalar_type(), state, [&](auto p, auto s) {
      multi_tensor_apply<kDepth>(lists, meta, StepFunctor<decltype(p), decltype(s)>{a});
    });
  }
  if (probe && total_chunks > 0) {
    const int threads = 128, work = static_cast<int>(num_scopes) * k;
    reduce_partials_kernel<<<(work + threads - 1) / threads, threads, 0,
                             at::cuda::getCurrentCUDAStream()>>>(
        a.partials, a.chunk_rows, total_chunks, k, static_cast<int>(num_scopes),
        d.data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
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
  for (size_t begin = 0; begin < rows.size(); begin += kMaxRows) {
    RowTable table{};
    table.count = static_cast<int>(std::min<size_t>(kMaxRows, rows.size() - begin));
    for (int i = 0; i < table.count; ++i) table.rows[i] = static_cast<int>(rows[begin + i]);
    finalize_kernel<<<1, kMaxRows, 0, at::cuda::getCurrentCUDAStream()>>>(
        stats.data_ptr<float>(), dc.data_ptr<float>(), hyper.data_ptr<double>(), inf, table,
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
