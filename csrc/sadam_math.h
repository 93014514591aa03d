// The S-Adam math, written once and shared by the CPU and CUDA kernels: the probe hash, the
// per-element AdamW update with damping, the per-tensor scalars and the per-scope finalize of
// the probe statistics. The update is a template over the value type V (float on CUDA and in
// scalar tails, at::vec::Vectorized<float> in the CPU main loop); Ops<V> supplies sqrt and max.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__) || defined(__HIPCC__)
#define SADAM_HD __host__ __device__ __forceinline__
#else
#define SADAM_HD inline
#endif

namespace sadam {

constexpr int kMaxProbes = 32;

// Columns of a statistics row (sadam/_layout.py), k = probes.
SADAM_HD int count_col(int k) { return 2 * k; }
SADAM_HD int epoch_col(int k) { return 2 * k + 1; }
SADAM_HD int rho_col(int k) { return 2 * k + 2; }
SADAM_HD int rho_applied_col(int k) { return 2 * k + 3; }
SADAM_HD int gamma_applied_col(int k) { return 2 * k + 4; }

// Order of the hyperparameters in the `hyper` tensor every op receives (device-resident, so
// Tensor learning rates and schedulers never force a host read).
enum Hyper { kLr = 0, kBeta1, kBeta2, kWeightDecay, kDamping, kNumHyper };

// ------------------------------------------------------------------------------ probe hash
constexpr uint32_t kGolden = 0x9E3779B9u;
constexpr uint32_t kM1 = 0x85EBCA6Bu;
constexpr uint32_t kM2 = 0xC2B2AE35u;

SADAM_HD uint32_t probe_key(uint32_t seed, uint32_t epoch, uint32_t tensor_id) {
  return seed ^ (kGolden * (epoch + 1u)) ^ (kM1 * (tensor_id + 1u));
}

// Split in two so a loop over a run of elements with the same high word vectorizes:
// probe_hash(e, key) == probe_mix(lo32(e) ^ probe_high(hi32(e), key)).
SADAM_HD uint32_t probe_high(uint32_t hi, uint32_t key) { return key ^ (hi * kM2); }

SADAM_HD uint32_t probe_mix(uint32_t x) {
  x ^= x >> 16;
  x *= kM1;
  x ^= x >> 13;
  x *= kM2;
  x ^= x >> 16;
  return x;
}

SADAM_HD uint32_t probe_hash(uint64_t index, uint32_t key) {
  return probe_mix(static_cast<uint32_t>(index) ^
                   probe_high(static_cast<uint32_t>(index >> 32), key));
}

// Epoch r of this step's directions for a statistics row: a full window redraws them first.
SADAM_HD uint32_t effective_epoch(const float* row, int k, int window) {
  float epoch = row[epoch_col(k)];
  if (window > 0 && row[count_col(k)] >= static_cast<float>(window)) epoch += 1.0f;
  return static_cast<uint32_t>(epoch);
}

// --------------------------------------------------------------------------- the update
template <typename V>
struct Ops;

template <>
struct Ops<float> {
  static SADAM_HD float sqrt(float x) { return ::sqrtf(x); }
  // NaN-propagating like torch.maximum.
  static SADAM_HD float max(float a, float b) { return (a != a || a > b) ? a : b; }
};

// Scalars of one tensor's step, computed once per tensor (or per CUDA block) in float64 like
// torch's AdamW (1 - beta2 from an fp32-rounded beta2 would be 5e-5 off); the per-element math
// is float32.
struct TensorScalars {
  float beta1, beta2, one_minus_beta1, one_minus_beta2;
  float decay;        // 1 - lr * weight_decay (decoupled, never damped)
  float step_size;    // lr * gamma / (1 - beta1^t)
  float bias2_sqrt;   // sqrt(1 - beta2^t)
  float eps;
};

// `t` is the step count after this step; `rho` the scope's current estimate (ignored undamped).
SADAM_HD TensorScalars tensor_scalars(const double* hyper, float eps, float t, float rho,
                                      bool damped) {
  TensorScalars s;
  const double lr = hyper[kLr], b1 = hyper[kBeta1], b2 = hyper[kBeta2];
  s.beta1 = static_cast<float>(b1);
  s.beta2 = static_cast<float>(b2);
  s.one_minus_beta1 = static_cast<float>(1.0 - b1);
  s.one_minus_beta2 = static_cast<float>(1.0 - b2);
  s.decay = static_cast<float>(1.0 - lr * hyper[kWeightDecay]);
  const double gamma = damped ? ::exp(-hyper[kDamping] * static_cast<double>(rho)) : 1.0;
  s.step_size = static_cast<float>(lr * gamma / (1.0 - ::pow(b1, static_cast<double>(t))));
  s.bias2_sqrt = static_cast<float>(::sqrt(1.0 - ::pow(b2, static_cast<double>(t))));
  s.eps = eps;
  return s;
}

// One element (or one vector of elements): g is the fp32 gradient already negated for
// `maximize` and unscaled. Updates m, v (and vmax with amsgrad) and returns the new parameter.
template <bool kAmsgrad, typename V>
SADAM_HD V adam_math(V p, V g, V& m, V& v, V& vmax, const TensorScalars& s) {
  m = V(s.beta1) * m + V(s.one_minus_beta1) * g;
  v = V(s.beta2) * v + V(s.one_minus_beta2) * g * g;
  V v_used = v;
  if (kAmsgrad) {
    vmax = Ops<V>::max(vmax, v);
    v_used = vmax;
  }
  const V denom = Ops<V>::sqrt(v_used) / V(s.bias2_sqrt) + V(s.eps);
  return p * V(s.decay) - V(s.step_size) * m / denom;
}

// ------------------------------------------------------------------------ the statistics
// Folds this step's directional derivatives d (k values) into one statistics row: EMA with
// bias correction, rho, the window reset, and the applied rho / gamma columns. A row whose d is
// not finite keeps its statistics. The caller skips the row entirely when found_inf is set.
SADAM_HD void finalize_row(float* row, const float* d, int k, float beta, float one_minus_beta,
                           int window, float damping, int lag) {
  const float rho_old = row[rho_col(k)];
  if (lag == 1) {  // the update that just ran applied the previous estimate
    row[rho_applied_col(k)] = rho_old;
    row[gamma_applied_col(k)] = ::expf(-damping * rho_old);
  }
  bool finite = true;
  for (int i = 0; i < k; ++i) finite = finite && ::fabsf(d[i]) <= 3.402823466e38f;  // false for NaN and inf
  if (finite) {
    const bool reset = window > 0 && row[count_col(k)] >= static_cast<float>(window);
    const float count = (reset ? 0.0f : row[count_col(k)]) + 1.0f;
    const float correction = 1.0f - ::powf(beta, count);
    float estimate = 0.0f;
    for (int i = 0; i < k; ++i) {
      const float a = beta * (reset ? 0.0f : row[i]) + one_minus_beta * d[i];
      const float b = beta * (reset ? 0.0f : row[k + i]) + one_minus_beta * d[i] * d[i];
      row[i] = a;
      row[k + i] = b;
      const float mean = a / correction;
      const float second = b / correction;
      const float var = mean * mean > second ? 0.0f : second - mean * mean;
      estimate += var / (second > 1e-30f ? second : 1e-30f);
    }
    row[count_col(k)] = count;
    row[epoch_col(k)] += reset ? 1.0f : 0.0f;
    if (count >= 2.0f) row[rho_col(k)] = estimate / static_cast<float>(k);
  }
  if (lag == 0) {
    row[rho_applied_col(k)] = row[rho_col(k)];
    row[gamma_applied_col(k)] = ::expf(-damping * row[rho_col(k)]);
  }
}

}  // namespace sadam
