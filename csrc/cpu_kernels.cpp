// CPU kernels of the native backend: one pass over all tensors of a param group with
// at::parallel_for over fixed-size chunks and at::vec::Vectorized math. Each chunk writes its own
// probe partials and the partials are summed in chunk order, so the result does not depend on
// the number of threads.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>
#include <torch/library.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "sadam_math.h"
#include "validation.h"

namespace sadam {

using Vec = at::vec::Vectorized<float>;
using IVec = at::vec::Vectorized<int32_t>;

template <>
struct Ops<Vec> {
  static Vec sqrt(Vec x) { return x.sqrt(); }
  static Vec max(Vec a, Vec b) { return at::vec::maximum(a, b); }
};

namespace {

constexpr int64_t kChunk = 1 << 15;  // elements per parallel task (fixed: thread-independent)
constexpr int kBlock = 1024;         // elements hashed and probed together while in L1
constexpr int kPartial = kMaxProbes;  // per chunk: d_0 .. d_31
constexpr int W = Vec::size();

// Two float vectors from 2*W elements of any supported dtype, and back (round to nearest even).
template <typename T>
inline void load2(const T* ptr, Vec& a, Vec& b) {
  if constexpr (std::is_same_v<T, float>) {
    a = Vec::loadu(ptr);
    b = Vec::loadu(ptr + W);
  } else {
    std::tie(a, b) = at::vec::convert_to_float<T>(at::vec::Vectorized<T>::loadu(ptr));
  }
}

template <typename T>
inline void store2(T* ptr, Vec a, Vec b) {
  if constexpr (std::is_same_v<T, float>) {
    a.store(ptr);
    b.store(ptr + W);
  } else {
    at::vec::convert_from_float<T>(a, b).store(ptr);
  }
}

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

// Logical right shift of 32-bit lanes (Vectorized<int32_t>::operator>> is arithmetic).
inline IVec shift_right_logical(IVec x, int s) {
  return (x >> IVec(s)) & IVec(static_cast<int32_t>(0xFFFFFFFFu >> s));
}

// probe_mix on W lanes; int32 wrap-around multiplication is the uint32 one.
inline IVec probe_mix_vec(IVec x) {
  x = x ^ shift_right_logical(x, 16);
  x = x * IVec(static_cast<int32_t>(kM1));
  x = x ^ shift_right_logical(x, 13);
  x = x * IVec(static_cast<int32_t>(kM2));
  return x ^ shift_right_logical(x, 16);
}

// acc[i] += s_(first+i) * g for i < 8: the sign is applied by flipping g's sign bit where bit
// first+i of the hash x is clear. `to_top` (24 - first) puts bit first+7 at the sign position.
inline void accumulate8(Vec* acc, Vec g, IVec x, IVec to_top) {
  IVec y = (x ^ IVec(-1)) << to_top;
  for (int i = 7; i >= 0; --i) {
    acc[i] = acc[i] + (g ^ at::vec::cast<float>(y & IVec(INT32_MIN)));
    y = y << IVec(1);
  }
}

// Adds the register sums of one block to the chunk's double partials.
inline void flush8(Vec* acc, double* partial) {
  alignas(64) float lanes[W];
  for (int i = 0; i < 8; ++i) {
    acc[i].store(lanes);
    for (int l = 0; l < W; ++l) partial[i] += lanes[l];
    acc[i] = Vec(0.0f);
  }
}

// Probes first .. first+7 over a block held in gbuf / bits.
inline void probe_group8(const float* gbuf, const uint32_t* bits, int count, int first,
                         double* partial) {
  Vec acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = Vec(0.0f);
  const IVec to_top(24 - first);
  for (int j = 0; j < count; j += W)
    accumulate8(acc, Vec::loadu(gbuf + j),
                IVec::loadu(reinterpret_cast<const int32_t*>(bits) + j), to_top);
  flush8(acc, partial + first);
}

// Probe groups from `from` on, over `count` elements of a block in gbuf / bits; partial[i]
// accumulates d_i for i < k rounded up to 8.
inline void probe_block(const float* gbuf, const uint32_t* bits, int count, int k, int from,
                        double* partial) {
  for (int first = from; first < k; first += 8) probe_group8(gbuf, bits, count, first, partial);
}

// Scalar probes of one element (block tails).
inline void probe_scalar(float g, uint32_t x, int k, double* partial) {
  for (int i = 0; i < k; ++i) partial[i] += ((x >> i) & 1u) ? g : -g;
}

template <typename P, typename S, bool kUpdate, bool kProbe, bool kAmsgrad>
void run_chunk(const TensorJob& t, int64_t begin, int64_t end, float gmul, int k,
               double* partial) {
  P* param = static_cast<P*>(t.param);
  const P* grad = static_cast<const P*>(t.grad);
  S* m_ptr = static_cast<S*>(t.exp_avg);
  S* v_ptr = static_cast<S*>(t.exp_avg_sq);
  S* vmax_ptr = static_cast<S*>(t.max_exp_avg_sq);
  const TensorScalars& s = t.scalars;
  alignas(64) float gbuf[kBlock];
  alignas(64) uint32_t bits[kBlock];
  const Vec gscale(gmul);
  const IVec to_top(24);
  Vec acc[8];
  for (int i = 0; i < 8; ++i) acc[i] = Vec(0.0f);

  for (int64_t b0 = begin; b0 < end; b0 += kBlock) {
    const int n = static_cast<int>(std::min<int64_t>(kBlock, end - b0));
    const int nvec = n / (2 * W) * (2 * W);
    const uint64_t e0 = t.offset + static_cast<uint64_t>(b0);
    const bool fused = kProbe && static_cast<uint32_t>(e0) <= UINT32_MAX - kBlock;
    const bool keep = kProbe && (!fused || k > 8);  // a second pass needs gbuf / bits
    IVec index, high;
    if (fused) {
      alignas(64) int32_t lane[W];
      for (int l = 0; l < W; ++l) lane[l] = static_cast<int32_t>(static_cast<uint32_t>(e0) + l);
      index = IVec::loadu(lane);
      high = IVec(static_cast<int32_t>(probe_high(static_cast<uint32_t>(e0 >> 32), t.key)));
    }
    for (int j = 0; j < nvec; j += 2 * W) {
      const int64_t e = b0 + j;
      Vec g0, g1;
      load2(grad + e, g0, g1);
      g0 = g0 * gscale;
      g1 = g1 * gscale;
      if constexpr (kUpdate) {
        Vec p0, p1, m0, m1, v0, v1, x0, x1;
        load2(param + e, p0, p1);
        load2(m_ptr + e, m0, m1);
        load2(v_ptr + e, v0, v1);
        if constexpr (kAmsgrad) load2(vmax_ptr + e, x0, x1);
        p0 = adam_math<kAmsgrad>(p0, g0, m0, v0, x0, s);
        p1 = adam_math<kAmsgrad>(p1, g1, m1, v1, x1, s);
        store2(param + e, p0, p1);
        store2(m_ptr + e, m0, m1);
        store2(v_ptr + e, v0, v1);
        if constexpr (kAmsgrad) store2(vmax_ptr + e, x0, x1);
      }
      if constexpr (kProbe) {
        if (keep) {
          g0.store(gbuf + j);
          g1.store(gbuf + j + W);
        }
        if (fused) {
          const IVec h0 = probe_mix_vec(index ^ high);
          const IVec h1 = probe_mix_vec((index + IVec(W)) ^ high);
          index = index + IVec(2 * W);
          if (keep) {
            h0.store(bits + j);
            h1.store(bits + j + W);
          }
          accumulate8(acc, g0, h0, to_top);
          accumulate8(acc, g1, h1, to_top);
        }
      }
    }
    for (int j = nvec; j < n; ++j) {  // scalar tail of the block, same math
      const int64_t e = b0 + j;
      const float g = static_cast<float>(grad[e]) * gmul;
      if constexpr (kProbe) probe_scalar(g, probe_hash(e0 + (j), t.key), k, partial);
      if constexpr (kUpdate) {
        float m = static_cast<float>(m_ptr[e]), v = static_cast<float>(v_ptr[e]);
        float x = kAmsgrad ? static_cast<float>(vmax_ptr[e]) : 0.0f;
        param[e] = static_cast<P>(adam_math<kAmsgrad>(static_cast<float>(param[e]), g, m, v, x, s));
        m_ptr[e] = static_cast<S>(m);
        v_ptr[e] = static_cast<S>(v);
        if constexpr (kAmsgrad) vmax_ptr[e] = static_cast<S>(x);
      }
    }
    if constexpr (kProbe) {
      if (fused) {
        flush8(acc, partial);
        if (k > 8) probe_block(gbuf, bits, nvec, k, 8, partial);
      } else {
        for (int j = 0; j < nvec; ++j) bits[j] = probe_hash(e0 + j, t.key);
        probe_block(gbuf, bits, nvec, k, 0, partial);
      }
    }
  }
}

using ChunkFn = void (*)(const TensorJob&, int64_t, int64_t, float, int, double*);

template <typename P, typename S>
ChunkFn pick_kernel(bool update, bool probe, bool amsgrad) {
  if (!update) return run_chunk<P, S, false, true, false>;
  if (probe) return amsgrad ? run_chunk<P, S, true, true, true> : run_chunk<P, S, true, true, false>;
  return amsgrad ? run_chunk<P, S, true, false, true> : run_chunk<P, S, true, false, false>;
}

template <typename P>
ChunkFn pick_for_state(at::ScalarType state, bool update, bool probe, bool amsgrad) {
  if (!update || state == at::kFloat) return pick_kernel<P, float>(update, probe, amsgrad);
  TORCH_CHECK(state == at::kBFloat16, "sadam: exp_avg must be float32 or bfloat16, got ", state);
  return pick_kernel<P, c10::BFloat16>(update, probe, amsgrad);
}

ChunkFn pick(at::ScalarType param, at::ScalarType state, bool update, bool probe, bool amsgrad) {
  switch (param) {
    case at::kFloat: return pick_for_state<float>(state, update, probe, amsgrad);
    case at::kBFloat16: return pick_for_state<c10::BFloat16>(state, update, probe, amsgrad);
    case at::kHalf: return pick_for_state<c10::Half>(state, update, probe, amsgrad);
    default: TORCH_CHECK(false, "sadam: params must be float32, bfloat16 or float16, got ", param);
  }
}

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
    return run_group(jobs, pick(grads[0].scalar_type(), state, false, true, false), gmul, k,
                     stats.size(0), true);
  }
  const double* h = hyper.data_ptr<double>();
  const float* st = stats.data_ptr<float>();
  std::vector<float> new_steps(jobs.size());
  for (size_t i = 0; i < jobs.size(); ++i) {
    new_steps[i] = steps[i].data_ptr<float>()[0] + 1.0f;
    const float rho = st[jobs[i].row * stats.size(1) + rho_col(k)];
    jobs[i].scalars = tensor_scalars(h, static_cast<float>(eps), new_steps[i], rho, damped);
  }
  at::Tensor d = run_group(jobs, pick(grads[0].scalar_type(), state, true, emit_probe, amsgrad),
                           gmul, k, stats.size(0), emit_probe);
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
  return run_group(jobs, pick(grads[0].scalar_type(), at::kFloat, false, true, false),
                   gradient_multiplier(grad_scale, maximize), k, stats.size(0), true);
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
