// Argument checks shared by the CPU and CUDA entry points: every list has one entry per tensor,
// every tensor is contiguous, on the right device and of a supported dtype. They run before any
// tensor is written, so a rejected step leaves everything as it was.
#pragma once

#include <ATen/ATen.h>

#include "sadam_math.h"

namespace sadam {

inline void check_list(at::TensorList list, size_t n, const char* name, at::DeviceType device,
                       at::TensorList like) {
  TORCH_CHECK(list.size() == n, "sadam: ", name, " has ", list.size(), " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device().type() == device, "sadam: ", name, "[", i, "] is on ", t.device(),
                ", expected ", device);
    TORCH_CHECK(t.is_contiguous(), "sadam: ", name, "[", i, "] must be contiguous");
    TORCH_CHECK(like.empty() || t.numel() == like[i].numel(), "sadam: ", name, "[", i, "] has ",
                t.numel(), " elements, the gradient ", like[i].numel());
    TORCH_CHECK(t.scalar_type() == list[0].scalar_type(), "sadam: ", name,
                " must share one dtype, got ", list[0].scalar_type(), " and ", t.scalar_type());
  }
}

inline void check_stats(const at::Tensor& stats, int64_t probes, at::DeviceType device) {
  TORCH_CHECK(probes >= 1 && probes <= kMaxProbes, "sadam: probes must be in [1, ", kMaxProbes,
              "], got ", probes);
  TORCH_CHECK(stats.device().type() == device && stats.scalar_type() == at::kFloat &&
                  stats.dim() == 2 && stats.is_contiguous() &&
                  stats.size(1) == row_width(static_cast<int>(probes)),
              "sadam: stats must be a contiguous (num_scopes, 2 * probes + 6) float32 tensor on ",
              device);
}

inline void check_hyper(const at::Tensor& hyper, at::DeviceType device) {
  TORCH_CHECK(hyper.device().type() == device && hyper.scalar_type() == at::kDouble &&
                  hyper.numel() == kNumHyper && hyper.is_contiguous(),
              "sadam: hyper must be a float64 tensor [lr, beta1, beta2, weight_decay, damping] "
              "on ", device);
}

inline void check_probe_args(at::TensorList grads, const at::Tensor& stats,
                             at::IntArrayRef scope_rows, at::IntArrayRef tensor_ids,
                             at::IntArrayRef offsets, int64_t probes, at::DeviceType device) {
  check_stats(stats, probes, device);
  const size_t n = grads.size();
  check_list(grads, n, "grads", device, {});
  TORCH_CHECK(scope_rows.size() == n && tensor_ids.size() == n && offsets.size() == n,
              "sadam: scope_rows, tensor_ids and offsets need one entry per tensor");
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(scope_rows[i] >= 0 && scope_rows[i] < stats.size(0), "sadam: scope_rows[", i,
                "] = ", scope_rows[i], " is not a row of stats");
    TORCH_CHECK(offsets[i] >= 0 && tensor_ids[i] >= 0, "sadam: offsets and tensor_ids must be >= 0");
  }
}

inline void check_update_args(at::TensorList params, at::TensorList grads,
                              at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                              at::TensorList max_exp_avg_sqs, at::TensorList steps,
                              const at::Tensor& stats, const at::Tensor& hyper,
                              at::IntArrayRef scope_rows, at::IntArrayRef tensor_ids,
                              at::IntArrayRef offsets, int64_t probes, bool amsgrad,
                              at::DeviceType device) {
  check_probe_args(grads, stats, scope_rows, tensor_ids, offsets, probes, device);
  check_hyper(hyper, device);
  const size_t n = grads.size();
  check_list(params, n, "params", device, grads);
  check_list(exp_avgs, n, "exp_avgs", device, grads);
  check_list(exp_avg_sqs, n, "exp_avg_sqs", device, grads);
  check_list(max_exp_avg_sqs, amsgrad ? n : 0, "max_exp_avg_sqs", device, grads);
  TORCH_CHECK(steps.size() == n, "sadam: steps has ", steps.size(), " tensors, expected ", n);
  for (size_t i = 0; i < n; ++i) {
    TORCH_CHECK(grads[i].scalar_type() == params[i].scalar_type(), "sadam: grads[", i,
                "] has dtype ", grads[i].scalar_type(), ", its parameter ", params[i].scalar_type());
    TORCH_CHECK(steps[i].numel() == 1 && steps[i].scalar_type() == at::kFloat &&
                    steps[i].device().type() == device,
                "sadam: steps[", i, "] must be a one-element float32 tensor on ", device);
  }
  if (n > 0) {
    TORCH_CHECK(exp_avg_sqs[0].scalar_type() == exp_avgs[0].scalar_type() &&
                    (!amsgrad || max_exp_avg_sqs[0].scalar_type() == exp_avgs[0].scalar_type()),
                "sadam: the moments must share one dtype");
  }
}

inline void check_finalize_args(const at::Tensor& stats, const at::Tensor& d,
                                const at::Tensor& hyper, at::IntArrayRef rows,
                                at::DeviceType device) {
  TORCH_CHECK(d.dim() == 2 && d.scalar_type() == at::kFloat && d.device().type() == device,
              "sadam: d must be a (num_scopes, probes) float32 tensor on ", device);
  check_stats(stats, d.size(1), device);
  check_hyper(hyper, device);
  TORCH_CHECK(d.size(0) == stats.size(0), "sadam: d has ", d.size(0), " rows, stats ",
              stats.size(0));
  for (int64_t row : rows)
    TORCH_CHECK(row >= 0 && row < stats.size(0), "sadam: row ", row, " is not a row of stats");
}

}  // namespace sadam
