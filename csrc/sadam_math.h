// The S-Adam math, written once and shared by the CPU and CUDA kernels: the probe hash, the
// per-element AdamW update with damping, the per-tensor scalars and the per-scope finalize of
// the probe statistics. The update is a template over the value type V (float on CUDA and in
// scalar tails, at::vec::Vectorized<float> in the CPU main loop); Ops<V> supplies sqrt and max.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

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
SADAM_HD int scale_col(int k) { return 2 * k + 5; }
SADAM_HD int row_width(int k) { return 2 * k + 6; }

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
// a and b are stored in units of 2^E and 2^(2E) (E = row[scale_col], sadam/_layout.py). The
// power-of-two arithmetic below works on the fp32 bits, so it is exact and gives the same bits
// as the reference and the Triton kernel.
constexpr int kScaleMin = -200;        // lowest E: below it a and b may underflow (they are 0)
constexpr int kAbsent = -(1 << 30);    // "no candidate" for the new E

SADAM_HD int32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_int(x);
#else
  int32_t i;
  std::memcpy(&i, &x, sizeof i);
  return i;
#endif
}

SADAM_HD float bits_float(int32_t i) {
#if defined(__CUDA_ARCH__)
  return __int_as_float(i);
#else
  float x;
  std::memcpy(&x, &i, sizeof x);
  return x;
#endif
}

// The exponent field minus 127 of x >= 0 (-127 for 0 and subnormals).
SADAM_HD int ilogb_bits(float x) { return ((float_bits(x) >> 23) & 0xFF) - 127; }

SADAM_HD int floor_half(int n) { return (n - (n & 1)) / 2; }

// 2^n exactly, for n in [-126, 127].
SADAM_HD float pow2(int n) { return bits_float((n + 127) << 23); }

// x * 2^n as two exact power-of-two factors (n clamped to [-252, 252]; no factor overflows).
SADAM_HD float times_pow2(float x, int n) {
  n = n < -252 ? -252 : (n > 252 ? 252 : n);
  const int half = floor_half(n);
  return x * pow2(half) * pow2(n - half);
}

// Folds this step's directional derivatives d (k values) into one statistics row: the new scale
// E', EMA with bias correction, rho, the window reset, and the applied rho / gamma columns. A row
// whose d is not finite keeps its statistics. The caller skips the row entirely when found_inf
// is set.
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
    // E': |d| / 2^E' < 2, |a|, sqrt(b) rescaled below 2 (the a term only matters once b has
    // underflowed); E where everything is 0
    const int scale = static_cast<int>(row[scale_col(k)]);
    float d_max = 0.0f, a_max = 0.0f, b_max = 0.0f;
    for (int i = 0; i < k; ++i) {
      const float d_abs = ::fabsf(d[i]), a_abs = reset ? 0.0f : ::fabsf(row[i]);
      const float b = reset ? 0.0f : row[k + i];
      d_max = d_abs > d_max ? d_abs : d_max;
      a_max = a_abs > a_max ? a_abs : a_max;
      b_max = b > b_max ? b : b_max;
    }
    int wanted = kAbsent;
    if (d_max > 0.0f) wanted = ilogb_bits(d_max);
    if (a_max > 0.0f && scale + ilogb_bits(a_max) > wanted) wanted = scale + ilogb_bits(a_max);
    if (b_max > 0.0f && scale + floor_half(ilogb_bits(b_max)) > wanted)
      wanted = scale + floor_half(ilogb_bits(b_max));
    const int rescaled = wanted == kAbsent ? scale : (wanted < kScaleMin ? kScaleMin : wanted);
    const int shift = scale - rescaled;
    float estimate = 0.0f;
    for (int i = 0; i < k; ++i) {
      const float d_scaled = times_pow2(d[i], -rescaled);
      const float a_old = times_pow2(reset ? 0.0f : row[i], shift);
      const float b_old = times_pow2(reset ? 0.0f : row[k + i], 2 * shift);
      const float a = beta * a_old + one_minus_beta * d_scaled;
      const float b = beta * b_old + one_minus_beta * d_scaled * d_scaled;
      row[i] = a;
      row[k + i] = b;
      const float mean = a / correction;
      const float second = b / correction;
      const float var = mean * mean > second ? 0.0f : second - mean * mean;
      estimate += second > 0.0f ? var / second : 0.0f;  // a term with B_i = 0 counts 0
    }
    row[count_col(k)] = count;
    row[epoch_col(k)] += reset ? 1.0f : 0.0f;
    row[scale_col(k)] = static_cast<float>(rescaled);
    if (count >= 2.0f) row[rho_col(k)] = estimate / static_cast<float>(k);
  }
  if (lag == 0) {
    row[rho_applied_col(k)] = row[rho_col(k)];
    row[gamma_applied_col(k)] = ::expf(-damping * row[rho_col(k)]);
  }
}

}  // namespace sadam
