// The vector CPU kernel. setup.py compiles this one file once per CPU capability, with the flags
// torch compiles its own kernels with (-DCPU_CAPABILITY=DEFAULT|AVX2|AVX512 and the -m flags), so
// it lands in namespace sadam::<capability>; the op driver (csrc/cpu_kernels.cpp) picks one at
// run time. Every capability follows the layout of chunk.h (16 fp32 probe lanes per 1024-element
// tile, 32-element vector steps, scalar tile tails), so results are bit-identical across them.
//
// Probe sums: d_i = 2 * S_i - S, with S_i the sum of g over elements whose hash has bit i set and
// S the sum of all g. That turns the sign flip into a masked add (one instruction with AVX-512
// masks, a blend with AVX2). One hash per element serves all k probes; the sums stay in fp32
// registers for a tile and are flushed to float64 lanes once per tile.
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#if defined(CPU_CAPABILITY_AVX2) || defined(CPU_CAPABILITY_AVX512)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstring>
#include <tuple>
#include <type_traits>

#include "cpu/chunk.h"

#ifndef CPU_CAPABILITY
#error "compile with -DCPU_CAPABILITY=DEFAULT, AVX2 or AVX512 (setup.py does)"
#endif

namespace sadam {

template <>
struct Ops<at::vec::Vectorized<float>> {
  using V = at::vec::Vectorized<float>;
  static V sqrt(V x) { return x.sqrt(); }
  static V max(V a, V b) { return at::vec::maximum(a, b); }
};

namespace CPU_CAPABILITY {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int W = Vec::size();
constexpr int kVecs = kLanes / W;  // vectors that hold the 16 probe lanes
constexpr int kAll = kMaxProbes;   // row of the plain sum S in the lane tables
static_assert(kLanes % W == 0 && kStep % (2 * W) == 0, "vector width must divide 16 lanes");
static_assert(kTile % kStep == 0 && kChunk % kTile == 0, "tiles must tile chunks");

// g where bit i of h is set, else +0.0, without a branch (the bits are random: a branch would
// mispredict half the time). Adding +0.0 leaves a sum unchanged unless it is -0.0, and the sums
// start at +0.0 and so never become -0.0: this is the masked add of the vector builds.
inline float masked(float g, uint32_t h, int i) {
  uint32_t bits;
  std::memcpy(&bits, &g, sizeof bits);
  bits &= 0u - ((h >> i) & 1u);
  std::memcpy(&g, &bits, sizeof bits);
  return g;
}

// ------------------------------------------------------------------ per-capability primitives
// HashVec holds W 32-bit hashes. first_indices(lo): lo, lo+1, ...; next_indices adds W;
// mix(index, high) is probe_mix(index ^ high) per lane; accumulate8(acc, g, h) adds g to acc[i]
// in the lanes where bit i of h is set (i < 8), leaving the other lanes untouched.
#if defined(CPU_CAPABILITY_AVX512)
using HashVec = __m512i;
inline HashVec broadcast(uint32_t x) { return _mm512_set1_epi32(static_cast<int>(x)); }
inline HashVec first_indices(uint32_t lo) {
  return _mm512_add_epi32(broadcast(lo),
                          _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
}
inline HashVec next_indices(HashVec i) { return _mm512_add_epi32(i, broadcast(W)); }
inline HashVec load_hash(const uint32_t* p) { return _mm512_loadu_si512(p); }
inline void store_hash(uint32_t* p, HashVec h) { _mm512_storeu_si512(p, h); }
inline HashVec shift_right(HashVec h, int s) { return _mm512_srl_epi32(h, _mm_cvtsi32_si128(s)); }
inline HashVec mix(HashVec x, HashVec high) {
  x = _mm512_xor_si512(x, high);
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
  x = _mm512_mullo_epi32(x, broadcast(kM1));
  x = _mm512_xor_si512(x, _mm512_srli_epi32(x, 13));
  x = _mm512_mullo_epi32(x, broadcast(kM2));
  return _mm512_xor_si512(x, _mm512_srli_epi32(x, 16));
}
inline void accumulate8(Vec* acc, Vec g, HashVec h) {
  for (int i = 0; i < 8; ++i) {
    const __mmask16 set = _mm512_test_epi32_mask(h, broadcast(1u << i));
    acc[i] = _mm512_mask_add_ps(acc[i], set, acc[i], g);
  }
}
#elif defined(CPU_CAPABILITY_AVX2)
using HashVec = __m256i;
inline HashVec broadcast(uint32_t x) { return _mm256_set1_epi32(static_cast<int>(x)); }
inline HashVec first_indices(uint32_t lo) {
  return _mm256_add_epi32(broadcast(lo), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline HashVec next_indices(HashVec i) { return _mm256_add_epi32(i, broadcast(W)); }
inline HashVec load_hash(const uint32_t* p) {
  return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
}
inline void store_hash(uint32_t* p, HashVec h) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), h);
}
inline HashVec shift_right(HashVec h, int s) { return _mm256_srl_epi32(h, _mm_cvtsi32_si128(s)); }
inline HashVec mix(HashVec x, HashVec high) {
  x = _mm256_xor_si256(x, high);
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
  x = _mm256_mullo_epi32(x, broadcast(kM1));
  x = _mm256_xor_si256(x, _mm256_srli_epi32(x, 13));
  x = _mm256_mullo_epi32(x, broadcast(kM2));
  return _mm256_xor_si256(x, _mm256_srli_epi32(x, 16));
}
inline void accumulate8(Vec* acc, Vec g, HashVec h) {
  __m256i y = _mm256_slli_epi32(h, 24);  // bit 7 at the sign, which blendv reads
  for (int i = 7; i >= 0; --i) {
    acc[i] = _mm256_blendv_ps(acc[i], _mm256_add_ps(acc[i], g), _mm256_castsi256_ps(y));
    y = _mm256_slli_epi32(y, 1);
  }
}
#else  // DEFAULT: the same lanes in portable scalar code (uint32 arithmetic, no signed overflow)
struct HashVec {
  uint32_t v[W];
};
inline HashVec broadcast(uint32_t x) {
  HashVec h;
  for (int l = 0; l < W; ++l) h.v[l] = x;
  return h;
}
inline HashVec first_indices(uint32_t lo) {
  HashVec h;
  for (int l = 0; l < W; ++l) h.v[l] = lo + static_cast<uint32_t>(l);
  return h;
}
inline HashVec next_indices(HashVec h) {
  for (int l = 0; l < W; ++l) h.v[l] += static_cast<uint32_t>(W);
  return h;
}
inline HashVec load_hash(const uint32_t* p) {
  HashVec h;
  std::copy(p, p + W, h.v);
  return h;
}
inline void store_hash(uint32_t* p, const HashVec& h) { std::copy(h.v, h.v + W, p); }
inline HashVec shift_right(HashVec h, int s) {
  for (int l = 0; l < W; ++l) h.v[l] >>= s;
  return h;
}
inline HashVec mix(HashVec x, const HashVec& high) {
  for (int l = 0; l < W; ++l) x.v[l] = probe_mix(x.v[l] ^ high.v[l]);
  return x;
}
inline void accumulate8(Vec* acc, Vec g, const HashVec& h) {
  alignas(64) float gl[W], a[W];
  g.store(gl);
  for (int i = 0; i < 8; ++i) {
    acc[i].store(a);
    for (int l = 0; l < W; ++l) a[l] += masked(gl[l], h.v[l], i);
    acc[i] = Vec::loadu(a);
  }
}
#endif

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

// The probe sums of one chunk: fp32 lane sums of the current tile, float64 lane sums of the chunk.
struct ProbeLanes {
  alignas(64) float tile[kMaxProbes + 1][kLanes];
  alignas(64) double chunk[kMaxProbes + 1][kLanes];

  // Vector accumulators of probes first .. first+7 (and of S when `all` is given) into the tile.
  void put(const Vec (*acc)[8], const Vec* all, int first) {
    for (int v = 0; v < kVecs; ++v) {
      for (int i = 0; i < 8; ++i) acc[v][i].store(&tile[first + i][v * W]);
      if (all) all[v].store(&tile[kAll][v * W]);
    }
  }
  void add_scalar(int lane, float g, uint32_t bits, int k) {
    tile[kAll][lane] += g;
    for (int i = 0; i < k; ++i) tile[i][lane] += masked(g, bits, i);
  }
  void flush(int rows) {
    for (int r = 0; r < rows; ++r)
      for (int l = 0; l < kLanes; ++l) chunk[r][l] += tile[r][l];
    for (int l = 0; l < kLanes; ++l) chunk[kAll][l] += tile[kAll][l];
  }
  // d_i = 2 * S_i - S, lanes summed in order.
  void finish(int k, double* partial) const {
    double all = 0.0;
    for (int l = 0; l < kLanes; ++l) all += chunk[kAll][l];
    for (int i = 0; i < k; ++i) {
      double s = 0.0;
      for (int l = 0; l < kLanes; ++l) s += chunk[i][l];
      partial[i] = 2.0 * s - all;
    }
  }
};

// Pointers of one tensor's job, typed.
template <typename P, typename S>
struct Tensors {
  P* param;
  const P* grad;
  S* m;
  S* v;
  S* vmax;
  explicit Tensors(const TensorJob& t)
      : param(static_cast<P*>(t.param)), grad(static_cast<const P*>(t.grad)),
        m(static_cast<S*>(t.exp_avg)), v(static_cast<S*>(t.exp_avg_sq)),
        vmax(static_cast<S*>(t.max_exp_avg_sq)) {}
};

// The vector part of one tile, elements [b0, b0 + nvec): the update (kUpdate) and probes 0..7
// (kProbe) in one pass. kHash: hash here (else read the tile's hashes from bits); kKeep: store
// g and the hashes for the sweeps of probes 8..31. The flags are template parameters so the
// loop body has no branches and the sums stay in registers.
template <typename P, typename S, bool kUpdate, bool kProbe, bool kAmsgrad, bool kHash, bool kKeep>
void vector_tile(const Tensors<P, S>& t, const TensorScalars& s, int64_t b0, int nvec, Vec gscale,
                 HashVec index, HashVec high, float* gbuf, uint32_t* bits, ProbeLanes& lanes) {
  Vec acc[kVecs][8], all[kVecs];
  for (int v = 0; v < kVecs; ++v) {
    all[v] = Vec(0.0f);
    for (int i = 0; i < 8; ++i) acc[v][i] = Vec(0.0f);
  }
  for (int j = 0; j < nvec; j += kStep) {
#pragma GCC unroll 4
    for (int q = 0; q < kStep / W; q += 2) {  // vectors q, q+1 of the step: lanes (q % kVecs)..
      const int64_t e = b0 + j + q * W;
      Vec g[2];
      load2(t.grad + e, g[0], g[1]);
      g[0] = g[0] * gscale;
      g[1] = g[1] * gscale;
      if constexpr (kUpdate) {
        Vec p0, p1, m0, m1, v0, v1, x0, x1;
        load2(t.param + e, p0, p1);
        load2(t.m + e, m0, m1);
        load2(t.v + e, v0, v1);
        if constexpr (kAmsgrad) load2(t.vmax + e, x0, x1);
        p0 = adam_math<kAmsgrad>(p0, g[0], m0, v0, x0, s);
        p1 = adam_math<kAmsgrad>(p1, g[1], m1, v1, x1, s);
        store2(t.param + e, p0, p1);
        store2(t.m + e, m0, m1);
        store2(t.v + e, v0, v1);
        if constexpr (kAmsgrad) store2(t.vmax + e, x0, x1);
      }
      if constexpr (kProbe) {
#pragma GCC unroll 2
        for (int h = 0; h < 2; ++h) {
          const int at = j + (q + h) * W;
          HashVec x;
          if constexpr (kHash) {
            x = mix(index, high);
            index = next_indices(index);
            if constexpr (kKeep) store_hash(bits + at, x);
          } else {
            x = load_hash(bits + at);
          }
          if constexpr (kKeep) g[h].store(gbuf + at);
          const int v = (q + h) % kVecs;
          all[v] = all[v] + g[h];
          accumulate8(acc[v], g[h], x);
        }
      }
    }
  }
  if constexpr (kProbe) lanes.put(acc, all, 0);
}

template <typename P, typename S, bool kUpdate, bool kProbe, bool kAmsgrad>
void run_chunk(const TensorJob& job, int64_t begin, int64_t end, float gmul, int k,
               double* partial) {
  const Tensors<P, S> t(job);
  const TensorScalars& s = job.scalars;
  const Vec gscale(gmul);
  const int groups = kProbe ? (k + 7) / 8 : 0;
  const bool keep = groups > 1;  // probes 8.. sweep the tile again from gbuf / bits
  alignas(64) float gbuf[kProbe ? kTile : 1];
  alignas(64) uint32_t bits[kProbe ? kTile : 1];
  ProbeLanes lanes;
  if constexpr (kProbe) std::fill(&lanes.chunk[0][0], &lanes.chunk[kAll][kLanes - 1] + 1, 0.0);

  for (int64_t b0 = begin; b0 < end; b0 += kTile) {
    const int n = static_cast<int>(std::min<int64_t>(kTile, end - b0));
    const int nvec = n / kStep * kStep;
    const uint64_t e0 = job.offset + static_cast<uint64_t>(b0);
    // Vector hashing needs the low word not to wrap inside the tile; else hash per element.
    const bool fused = static_cast<uint32_t>(e0) <= UINT32_MAX - kTile;
    if constexpr (kProbe) {
      const HashVec index = first_indices(static_cast<uint32_t>(e0));
      const HashVec high = broadcast(probe_high(static_cast<uint32_t>(e0 >> 32), job.key));
      if (!fused)
        for (int j = 0; j < n; ++j) bits[j] = probe_hash(e0 + j, job.key);
#define SADAM_TILE(hash, keep_)                                                                 \
  vector_tile<P, S, kUpdate, true, kAmsgrad, hash, keep_>(t, s, b0, nvec, gscale, index, high, \
                                                          gbuf, bits, lanes)
      if (fused && keep) SADAM_TILE(true, true);
      else if (fused) SADAM_TILE(true, false);
      else if (keep) SADAM_TILE(false, true);
      else SADAM_TILE(false, false);
#undef SADAM_TILE
      for (int first = 8; first < 8 * groups; first += 8) {  // probes 8..31 while in L1
        Vec more[kVecs][8];
        for (int v = 0; v < kVecs; ++v)
          for (int i = 0; i < 8; ++i) more[v][i] = Vec(0.0f);
        for (int j = 0; j < nvec; j += W)
          accumulate8(more[(j / W) % kVecs], Vec::loadu(gbuf + j),
                      shift_right(load_hash(bits + j), first));
        lanes.put(more, nullptr, first);
      }
    } else {
      const HashVec unused = broadcast(0);
      vector_tile<P, S, kUpdate, false, kAmsgrad, false, false>(t, s, b0, nvec, gscale, unused,
                                                               unused, gbuf, bits, lanes);
    }
    for (int j = nvec; j < n; ++j) {  // scalar tail of the tile, same math and lanes
      const int64_t e = b0 + j;
      const float g = static_cast<float>(t.grad[e]) * gmul;
      if constexpr (kProbe)
        lanes.add_scalar(j % kLanes, g, fused ? probe_hash(e0 + j, job.key) : bits[j], k);
      if constexpr (kUpdate) {
        float m = static_cast<float>(t.m[e]), v = static_cast<float>(t.v[e]);
        float x = kAmsgrad ? static_cast<float>(t.vmax[e]) : 0.0f;
        t.param[e] =
            static_cast<P>(adam_math<kAmsgrad>(static_cast<float>(t.param[e]), g, m, v, x, s));
        t.m[e] = static_cast<S>(m);
        t.v[e] = static_cast<S>(v);
        if constexpr (kAmsgrad) t.vmax[e] = static_cast<S>(x);
      }
    }
    if constexpr (kProbe) lanes.flush(8 * groups);
  }
  if constexpr (kProbe) lanes.finish(k, partial);
}

template <typename P, typename S>
ChunkFn pick_kernel(bool update, bool probe, bool amsgrad) {
  if (!update) return run_chunk<P, S, false, true, false>;
  if (probe)
    return amsgrad ? run_chunk<P, S, true, true, true> : run_chunk<P, S, true, true, false>;
  return amsgrad ? run_chunk<P, S, true, false, true> : run_chunk<P, S, true, false, false>;
}

template <typename P>
ChunkFn pick_for_state(c10::ScalarType state, bool update, bool probe, bool amsgrad) {
  if (!update || state == c10::kFloat) return pick_kernel<P, float>(update, probe, amsgrad);
  TORCH_CHECK(state == c10::kBFloat16, "sadam: exp_avg must be float32 or bfloat16, got ", state);
  return pick_kernel<P, c10::BFloat16>(update, probe, amsgrad);
}

}  // namespace

ChunkFn pick_chunk_kernel(c10::ScalarType param, c10::ScalarType state, bool update, bool probe,
                          bool amsgrad) {
  switch (param) {
    case c10::kFloat: return pick_for_state<float>(state, update, probe, amsgrad);
    case c10::kBFloat16: return pick_for_state<c10::BFloat16>(state, update, probe, amsgrad);
    case c10::kHalf: return pick_for_state<c10::Half>(state, update, probe, amsgrad);
    default: TORCH_CHECK(false, "sadam: params must be float32, bfloat16 or float16, got ", param);
  }
}

}  // namespace CPU_CAPABILITY
}  // namespace sadam
