// CPU ops of the native backend: one pass over all tensors of a param group with
// at::parallel_for over fixed-size chunks, each run by the vector kernel of the active CPU
// capability (csrc/cpu/kernel.cpp, csrc/cpu/dispatch.cpp). Each chunk writes its own probe
// partials and the partials are summed in chunk order, so the result does not depend on the
// number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "cpu/chunk.h"
#include "cpu/dispatch.h"
#include "sadam_math.h"
#include "validation.h"

namespace sadam {
namespace {

// Runs `fn` over every chunk of every tensor and returns d (num_scopes, k): the chunk partials
// summed in a fixed order in double, then rounded to fp32.
at::Tensor run_group(const std::vector<TensorJob>& jobs, ChunkFn fn, float gmul, int k,
                     int64_t num_scopes, bool probe) {
  std::vector<std::pair<int, int64_t>> chunks;  // (tensor, first element)
  for (size_t i = 0; i < jobs.size(); ++i)
    for (int64_t b = 0; b < jobs[i].numel; b += kChunk) chunks.emplace_back(static_cast<int>(i), b);
  std::vector<double> partials(probe ? chunks.size() * kPartial : 0, 0.0);
  at::parallel_for(0, static_cast<int64_t>(chunks.size()), 1, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      const TensorJob& job = jobs[chunks[c].first];
      const int64_t b = chunks[c].second;
      fn(job, b, std::min(b + kChunk, job.numel), gmul, k,
         probe ? &partials[c * kPartial] : nullptr);
    }
  });
  at::Tensor d = at::zeros({probe ? num_scopes : 0, k}, at::dtype(at::kFloat));
  if (!probe) return d;
  std::vector<double> sums(num_scopes * k, 0.0);
  for (size_t c = 0; c < chunks.size(); ++c) {
    double* out = &sums[jobs[chunks[c].first].row * k];
    const double* part = &partials[c * kPartial];
    for (int i = 0; i < k; ++i) out[i] += part[i];
  }
  float* dp = d.data_ptr<float>();
  for (size_t i = 0; i < sums.size(); ++i) dp[i] = static_cast<float>(sums[i]);
  return d;
}

float gradient_multiplier(const std::optional<at::Tensor>& grad_scale, bool maximize) {
  float gmul = maximize ? -1.0f : 1.0f;
  if (grad_scale.has_value()) gmul /= grad_scale->to(at::kFloat).data_ptr<float>()[0];
  return gmul;
}

bool found_inf_set(const std::optional<at::Tensor>& found_inf) {
  return found_inf.has_value() && found_inf->to(at::kFloat).data_ptr<float>()[0] > 0.0f;
}

std::vector<TensorJob> make_jobs(at::TensorList params, at::TensorList grads,
                                 at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                                 at::TensorList max_exp_avg_sqs, const at::Tensor& stats,
                                 at::IntArrayRef scope_rows, at::IntArrayRef tensor_ids,
                                 at::IntArrayRef offsets, int k, int64_t window, int64_t seed) {
  const float* st = stats.data_ptr<float>();
  const int64_t width = stats.size(1);
  std::vector<TensorJob> jobs(grads.size());
  for (size_t i = 0; i < grads.size(); ++i) {
    TensorJob& j = jobs[i];
    j.grad = grads[i].data_ptr();
    j.param = params.empty() ? nullptr : params[i].data_ptr();
    j.exp_avg = exp_avgs.empty() ? nullptr : exp_avgs[i].data_ptr();
    j.exp_avg_sq = exp_avg_sqs.empty() ? nullptr : exp_avg_sqs[i].data_ptr();
    j.max_exp_avg_sq = max_exp_avg_sqs.empty() ? nullptr : max_exp_avg_sqs[i].data_ptr();
    j.numel = grads[i].numel();
    j.offset = static_cast<uint64_t>(offsets[i]);
    j.row = static_cast<int>(scope_rows[i]);
    const uint32_t epoch = effective_epoch(st + j.row * width, k, static_cast<int>(window));
    j.key = probe_key(static_cast<uint32_t>(seed), epoch, static_cast<uint32_t>(tensor_ids[i]));
  }
  return jobs;
}

at::Tensor update_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                      at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                      at::TensorList steps, const at::Tensor& stats, const at::Tensor& hyper,
                      const std::optional<at::Tensor>& grad_scale,
                      const std::optional<at::Tensor>& found_inf, at::IntArrayRef scope_rows,
                      at::IntArrayRef tensor_ids, at::IntArrayRef offsets, double eps,
                      int64_t probes, int64_t window, int64_t seed, bool amsgrad, bool maximize,
                      bool damped, bool emit_probe) {
  check_update_args(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps, stats, hyper,
                    scope_rows, tensor_ids, offsets, probes, amsgrad, at::kCPU);
  const int k = static_cast<int>(probes);
  const float gmul = gradient_multiplier(grad_scale, maximize);
  std::vector<TensorJob> jobs = make_jobs(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs,
                                          stats, scope_rows, tensor_ids, offsets, k, window, seed);
  const bool skip = found_inf_set(found_inf);  // GradScaler found an inf: change nothing
  const at::ScalarType state = exp_avgs.empty() ? at::kFloat : exp_avgs[0].scalar_type();
  if (skip || grads.empty()) {
    if (!emit_probe || grads.empty())
      return at::zeros({emit_probe ? stats.size(0) : 0, k}, at::dtype(at::kFloat));
    return run_group(jobs, pick_chunk_kernel(grads[0].scalar_type(), state, false, true, false),
                     gmul, k, stats.size(0), true);
  }
  const double* h = hyper.data_ptr<double>();
  const float* st = stats.data_ptr<float>();
  std::vector<float> new_steps(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    new_steps[i] = steps[i].data_ptr<float>()[0] + 1.0f;
    const float rho = st[jobs[i].row * stats.size(1) + rho_col(k)];
    jobs[i].scalars = tensor_scalars(h, static_cast<float>(eps), new_steps[i], rho, damped);
  }
  const ChunkFn fn = pick_chunk_kernel(grads[0].scalar_type(), state, true, emit_probe, amsgrad);
  at::Tensor d = run_group(jobs, fn, gmul, k, stats.size(0), emit_probe);
  for (size_t i = 0; i < jobs.size(); ++i) steps[i].data_ptr<float>()[0] = new_steps[i];
  return d;
}

at::Tensor directional_cpu(at::TensorList grads, const at::Tensor& stats,
                           const std::optional<at::Tensor>& grad_scale, at::IntArrayRef scope_rows,
                           at::IntArrayRef tensor_ids, at::IntArrayRef offsets, int64_t probes,
                           int64_t window, int64_t seed, bool maximize) {
  check_probe_args(grads, stats, scope_rows, tensor_ids, offsets, probes, at::kCPU);
  const int k = static_cast<int>(probes);
  if (grads.empty()) return at::zeros({stats.size(0), k}, at::dtype(at::kFloat));
  std::vector<TensorJob> jobs = make_jobs({}, grads, {}, {}, {}, stats, scope_rows, tensor_ids,
                                          offsets, k, window, seed);
  const ChunkFn fn = pick_chunk_kernel(grads[0].scalar_type(), at::kFloat, false, true, false);
  return run_group(jobs, fn, gradient_multiplier(grad_scale, maximize), k, stats.size(0), true);
}

void finalize_cpu(const at::Tensor& stats, const at::Tensor& d, const at::Tensor& hyper,
                  const std::optional<at::Tensor>& found_inf, at::IntArrayRef rows,
                  double probe_beta, int64_t window, int64_t lag) {
  check_finalize_args(stats, d, hyper, rows, at::kCPU);
  if (found_inf_set(found_inf)) return;
  const int k = static_cast<int>(d.size(1));
  const at::Tensor dc = d.contiguous();
  const float damping = static_cast<float>(hyper.data_ptr<double>()[kDamping]);
  for (int64_t row : rows)
    finalize_row(stats.data_ptr<float>() + row * stats.size(1), dc.data_ptr<float>() + row * k, k,
                 static_cast<float>(probe_beta), static_cast<float>(1.0 - probe_beta),
                 static_cast<int>(window), damping, static_cast<int>(lag));
}

}  // namespace

TORCH_LIBRARY_IMPL(sadam, CPU, m) {
  m.impl("native_update", &update_cpu);
  m.impl("native_directional", &directional_cpu);
  m.impl("native_finalize", &finalize_cpu);
}

}  // namespace sadam
