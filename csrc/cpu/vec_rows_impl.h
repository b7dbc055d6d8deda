// Body of the vectorised CPU row kernels, included by exactly one translation unit per
// instruction set (vec_rows_{avx512,avx2,base}.cpp).
//
// Rules that keep a run-time-dispatched build safe:
//  * the target pragma comes first, and everything defined here lives in an anonymous
//    namespace, so no function compiled for AVX-512 can be picked by the linker for a caller
//    on a machine without it;
//  * nothing but <stdint.h> and the intrinsics headers is included: no library
//    inline functions get instantiated under the wider target.
//
// The code is written once with GCC vector extensions (W lanes of float) and the compiler
// emits the instruction set of the pragma.  Only the float16 conversions use intrinsics.
#pragma once

#if defined(XENT_VEC_AVX512)
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,fma,f16c,bmi2")
#define XENT_ISA_NS isa_avx512
#define XENT_W 16
#elif defined(XENT_VEC_AVX2)
#pragma GCC target("avx2,fma,f16c,bmi2")
#define XENT_ISA_NS isa_avx2
#define XENT_W 8
#else
#define XENT_ISA_NS isa_base
#define XENT_W 4
#endif
// Vector returns between functions of this file only: the ABI note does not apply.  GCC 12
// also flags a false "maybe uninitialized" inside _mm512_cvtps_ph.
#pragma GCC diagnostic ignored "-Wpsabi"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
// a*b+c into one FMA where the target has it: the exp polynomial relies on it for speed.
#pragma GCC optimize("fp-contract=fast")

#include <stdint.h>

#if defined(__x86_64__) && (defined(XENT_VEC_AVX512) || defined(XENT_VEC_AVX2))
#include <immintrin.h>
#endif

#include "vec_rows.h"

namespace xent_cpu {
namespace XENT_ISA_NS {
namespace {

constexpr int W = XENT_W;
typedef float vf __attribute__((vector_size(W * 4), aligned(4)));
typedef int32_t vi __attribute__((vector_size(W * 4), aligned(4)));
typedef uint32_t vu __attribute__((vector_size(W * 4), aligned(4)));
typedef uint16_t vh __attribute__((vector_size(W * 2), aligned(2)));

// Chunk of a row whose max is taken before its exps: small enough to stay in L1 between the
// two sweeps (8 KiB of float32), large enough that the per-chunk rescale is negligible.
constexpr int64_t kChunk = 2048;

inline vf splat(float v) {
  return vf{} + v;
}
inline vf as_f(vu v) {
  return (vf)v;
}  // same-size vector casts reinterpret the bits
inline vu as_u(vf v) {
  return (vu)v;
}
inline vi as_i(vf v) {
  return (vi)v;
}
inline vi iota() {
  vi l;
  for (int i = 0; i < W; ++i) l[i] = i;
  return l;
}
inline vf vmax(vf a, vf b) {
  return a > b ? a : b;
}

inline float hmax(vf v) {
  float m = v[0];
  for (int i = 1; i < W; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline float hsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < W; ++i) s += v[i];
  return s;
}

inline float scalar_exp(float x) {
  return __builtin_expf(x);
}

// exp(x) for float32 lanes: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and the
// Cephes degree-6 polynomial for exp(r).  Maximum error measured against exp in float64
// over [-87.3, 88.3]: 2 ulp (tests/test_cpu_paths.py checks it).  Below -87.33 (where the
// result would be subnormal) it returns 0; NaN stays NaN.
inline vf vexp(vf x) {
  const vf lo = splat(-87.33654f), hi = splat(88.3f);
  const vi underflow = x < lo;
  x = x > hi ? hi : x;
  x = x < lo ? lo : x;
  const vf magic = splat(12582912.f);  // 1.5 * 2^23: adding it rounds to an integer
  vf fn = x * 1.44269504088896341f + magic;
  const vi n = as_i(fn) - as_i(magic);
  fn = fn - magic;
  vf r = x - fn * 0.693359375f;
  r = r - fn * -2.12194440e-4f;
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.f;
  const vu scale = ((vu)n + 127u) << 23;
  const vf res = p * as_f(scale);
  return underflow ? splat(0.f) : res;
}

// tanh(u) = 1 - 2 / (exp(2u) + 1), odd-symmetric form for accuracy near 0 is not needed at
// the tolerances of a softcapped loss; the sign is restored from u.
inline vf vtanh(vf u) {
  const vi neg = u < 0.f;
  const vf a = neg ? -u : u;
  const vf e = vexp(a * -2.f);  // in (0, 1]
  const vf t = (1.f - e) / (1.f + e);
  return neg ? -t : t;
}

// ----- float16 / bfloat16 <-> float32 -------------------------------------------------------
inline vf h2f(vh h16) {
  const vu h = __builtin_convertvector(h16, vu);
  const vu sign = (h & 0x8000u) << 16;
  const vu em = h & 0x7fffu;
  // The shifted bits read as a float 2^112 too small (also for subnormals): rescale.
  vu bits = as_u(as_f(em << 13) * 5.192296858534828e+33f);   // 2^112
  bits = em >= 0x7c00u ? ((em << 13) | 0x7f800000u) : bits;  // inf, NaN
  return as_f(bits | sign);
}

inline uint16_t f2h_scalar(float f) {
  uint32_t x;
  __builtin_memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000u;
  x &= 0x7fffffffu;
  if (x >= 0x47800000u) return sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u);
  if (x < 0x38800000u) {  // becomes a subnormal or zero: let the FPU round at 2^-24
    float a;
    __builtin_memcpy(&a, &x, 4);
    a += 0.5f;
    uint32_t ab;
    __builtin_memcpy(&ab, &a, 4);
    return sign | (ab - 0x3f000000u);
  }
  const uint32_t odd = (x >> 13) & 1u;
  x += 0xc8000fffu + odd;  // rebias the exponent, round to nearest even
  return sign | (x >> 13);
}

inline vh f2h(vf f) {
#if defined(XENT_VEC_AVX512)
  return (vh)_mm512_cvtps_ph((__m512)f, _MM_FROUND_TO_NEAREST_INT);
#elif defined(XENT_VEC_AVX2)
  return (vh)_mm256_cvtps_ph((__m256)f, _MM_FROUND_TO_NEAREST_INT);
#else
  vh r;
  for (int i = 0; i < W; ++i) r[i] = f2h_scalar(f[i]);
  return r;
#endif
}

inline vf bf2f(vh h) {
  return as_f(__builtin_convertvector(h, vu) << 16);
}

inline vh f2bf(vf f) {
  const vu b = as_u(f);
  const vu rounded = (b + (0x7fffu + ((b >> 16) & 1u))) >> 16;
  const vu nan = (b & 0x7fffffffu) > 0x7f800000u;
  return __builtin_convertvector(nan ? ((b >> 16) | 0x40u) : rounded, vh);
}

// ----- loads and stores of W elements, and of a ragged tail ---------------------------------
template <Dtype D>
struct Io;

template <>
struct Io<Dtype::f32> {
  using elem = float;
  static vf load(const float* p) {
    vf v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
  }
  static void store(float* p, vf v) { __builtin_memcpy(p, &v, sizeof v); }
  static float neg_inf() { return -__builtin_inff(); }
};
template <>
struct Io<Dtype::bf16> {
  using elem = uint16_t;
  static vf load(const uint16_t* p) {
    vh v;
    __builtin_memcpy(&v, p, sizeof v);
    return bf2f(v);
  }
  static void store(uint16_t* p, vf v) {
    const vh h = f2bf(v);
    __builtin_memcpy(p, &h, sizeof h);
  }
  static uint16_t neg_inf() { return 0xff80u; }
};
template <>
struct Io<Dtype::f16> {
  using elem = uint16_t;
  static vf load(const uint16_t* p) {
    vh v;
    __builtin_memcpy(&v, p, sizeof v);
    return h2f(v);
  }
  static void store(uint16_t* p, vf v) {
    const vh h = f2h(v);
    __builtin_memcpy(p, &h, sizeof h);
  }
  static uint16_t neg_inf() { return 0xfc00u; }
};

// The last n < W elements, padded with -inf (which every kernel here treats as "absent").
template <Dtype D>
inline vf load_tail(const typename Io<D>::elem* p, int64_t n) {
  typename Io<D>::elem buf[W];
  for (int i = 0; i < W; ++i) buf[i] = Io<D>::neg_inf();
  __builtin_memcpy(buf, p, n * sizeof(buf[0]));
  return Io<D>::load(buf);
}

inline vf load_w(const float* w, int64_t i, int64_t n_left) {
  if (w == nullptr) return splat(1.f);
  if (n_left >= W) return Io<Dtype::f32>::load(w + i);
  float buf[W] = {};
  __builtin_memcpy(buf, w + i, n_left * sizeof(float));
  return Io<Dtype::f32>::load(buf);
}

template <bool kCap>
inline vf transform(vf x, VecTransform t) {
  if (!kCap) return x * t.scale;
  const vf y = vtanh(x * (t.scale / t.softcap)) * t.softcap;
  return x == -__builtin_inff() ? x : y;
}

template <bool kCap>
inline vf slope(vf x, VecTransform t) {
  if (!kCap) return splat(t.scale);
  const vf th = vtanh(x * (t.scale / t.softcap));
  const vf s = (1.f - th * th) * t.scale;
  return x == -__builtin_inff() ? splat(0.f) : s;
}

// ----- the two row kernels ------------------------------------------------------------------
template <Dtype D, bool kCap>
RowStats stats_impl(const void* xv, int64_t n, VecTransform t, const float* w, bool want_dot,
                    float ref) {
  const auto* x = static_cast<const typename Io<D>::elem*>(xv);
  const float ninf = -__builtin_inff();
  float run_max = ninf, run_sum = 0.f;
  vf dot = splat(0.f);
  const vi lane = iota();
  for (int64_t c0 = 0; c0 < n; c0 += kChunk) {
    const int64_t c1 = c0 + kChunk < n ? c0 + kChunk : n;
    // Sweep 1: the chunk's max (brings the chunk into L1).
    vf m = splat(ninf);
    int64_t i = c0;
    for (; i + W <= c1; i += W) m = vmax(m, transform<kCap>(Io<D>::load(x + i), t));
    if (i < c1) m = vmax(m, transform<kCap>(load_tail<D>(x + i, c1 - i), t));
    const float cmax = hmax(m);
    if (cmax > run_max) {
      run_sum = run_max == ninf ? 0.f : run_sum * scalar_exp(run_max - cmax);
      run_max = cmax;
    }
    // Sweep 2: exps against the updated running max (from L1).
    const bool all_masked = run_max == ninf;
    const vf mv = splat(run_max);
    vf s = splat(0.f);
    for (i = c0; i < c1; i += W) {
      const int64_t left = c1 - i;
      const vf y = transform<kCap>(left >= W ? Io<D>::load(x + i) : load_tail<D>(x + i, left), t);
      if (!all_masked) s += vexp(y - mv);
      if (want_dot) {
        const vf d = load_w(w, i, left) * (y - ref);
        dot += left >= W ? d : (lane < static_cast<int32_t>(left) ? d : splat(0.f));
      }
    }
    run_sum += hsum(s);
  }
  // A NaN logit is invisible to max but not to exp(NaN - max): the sum carries it.
  return RowStats{run_max, run_sum, want_dot ? hsum(dot) : 0.f};
}

template <Dtype D, bool kCap>
void grad_impl(const void* xv, void* gv, int64_t n, VecTransform t, float lse, float a, float b,
               const float* w) {
  const auto* x = static_cast<const typename Io<D>::elem*>(xv);
  auto* g = static_cast<typename Io<D>::elem*>(gv);
  const vf lv = splat(lse);
  int64_t i = 0;
  for (; i + W <= n; i += W) {
    const vf xi = Io<D>::load(x + i);
    vf gi = vexp(transform<kCap>(xi, t) - lv) * a - load_w(w, i, W) * b;
    if (kCap || t.scale != 1.f) gi *= slope<kCap>(xi, t);
    Io<D>::store(g + i, gi);
  }
  if (i < n) {
    const vf xi = load_tail<D>(x + i, n - i);
    vf gi = vexp(transform<kCap>(xi, t) - lv) * a - load_w(w, i, n - i) * b;
    if (kCap || t.scale != 1.f) gi *= slope<kCap>(xi, t);
    typename Io<D>::elem buf[W];
    Io<D>::store(buf, gi);
    __builtin_memcpy(g + i, buf, (n - i) * sizeof(buf[0]));
  }
}

template <Dtype D>
RowStats stats_dt(const void* x, int64_t n, VecTransform t, const float* w, bool want_dot,
                  float ref) {
  return t.softcap > 0.f ? stats_impl<D, true>(x, n, t, w, want_dot, ref)
                         : stats_impl<D, false>(x, n, t, w, want_dot, ref);
}

RowStats stats(const void* x, Dtype dt, int64_t n, VecTransform t, const float* w, bool want_dot,
               float ref) {
  switch (dt) {
    case Dtype::f16:
      return stats_dt<Dtype::f16>(x, n, t, w, want_dot, ref);
    case Dtype::bf16:
      return stats_dt<Dtype::bf16>(x, n, t, w, want_dot, ref);
    default:
      return stats_dt<Dtype::f32>(x, n, t, w, want_dot, ref);
  }
}

template <Dtype D>
void grad_dt(const void* x, void* g, int64_t n, VecTransform t, float lse, float a, float b,
             const float* w) {
  if (t.softcap > 0.f) {
    grad_impl<D, true>(x, g, n, t, lse, a, b, w);
  } else {
    grad_impl<D, false>(x, g, n, t, lse, a, b, w);
  }
}

void grad(const void* x, void* g, Dtype dt, int64_t n, VecTransform t, float lse, float a, float b,
          const float* w) {
  switch (dt) {
    case Dtype::f16:
      return grad_dt<Dtype::f16>(x, g, n, t, lse, a, b, w);
    case Dtype::bf16:
      return grad_dt<Dtype::bf16>(x, g, n, t, lse, a, b, w);
    default:
      return grad_dt<Dtype::f32>(x, g, n, t, lse, a, b, w);
  }
}

void exp_rows(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) Io<Dtype::f32>::store(y + i, vexp(Io<Dtype::f32>::load(x + i)));
  for (; i < n; ++i) {
    float buf[W] = {};
    buf[0] = x[i];
    y[i] = vexp(Io<Dtype::f32>::load(buf))[0];
  }
}

}  // namespace

#define XENT_STR2(x) #x
#define XENT_STR(x) XENT_STR2(x)
const VecKernels table = {XENT_STR(XENT_ISA_NS), &stats, &grad, &exp_rows};

}  // namespace XENT_ISA_NS
}  // namespace xent_cpu
