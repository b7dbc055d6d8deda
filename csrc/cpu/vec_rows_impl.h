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
#pragma GCC diagnostic ignored "-Wuninitialized"
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
// Unaligned, aliasing views for loads and stores (one instruction each, no memcpy call).
typedef float vf_mem __attribute__((vector_size(W * 4), aligned(1), may_alias));
typedef uint16_t vh_mem __attribute__((vector_size(W * 2), aligned(1), may_alias));

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

#if defined(XENT_VEC_AVX512)
inline float hmax(vf v) {
  return _mm512_reduce_max_ps((__m512)v);
}
inline float hsum(vf v) {
  return _mm512_reduce_add_ps((__m512)v);
}
#else
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
#endif

inline float scalar_exp(float x) {
  return __builtin_expf(x);
}
inline double scalar_exp(double x) {
  return __builtin_exp(x);
}

// exp(x) for float32 lanes: Cody-Waite range reduction x = n ln2 + r, |r| <= ln2/2, and the
// Cephes degree-6 polynomial for exp(r).  Maximum error measured against exp in float64
// over [-87.3, 88.3]: 2 ulp (tests/test_extreme.py checks it).  Below -87.33 (where the
// result would be subnormal) it returns 0; NaN stays NaN.
// exp(r) for |r| <= ln2 / 2: the Cephes degree-6 polynomial.
inline vf exp_poly(vf r) {
  vf p = splat(1.9875691500e-4f);
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  return (p * r + 1.f) * r + 1.f;  // 1 + r + r^2 P(r) in two FMAs
}

#if defined(XENT_VEC_AVX512)
// AVX-512: the same reduction and polynomial, with vrndscaleps for the rounding and vscalefps
// for the 2^n scaling (which also overflows to inf correctly); lanes below the normal range
// (and -inf) are zeroed by the mask, NaN lanes stay NaN.
inline vf vexp(vf x) {
  const __m512 xv = (__m512)x;
  const __mmask16 normal = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 fn = _mm512_roundscale_ps(_mm512_mul_ps(xv, _mm512_set1_ps(1.44269504088896341f)),
                                         _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  vf r = (vf)_mm512_fnmadd_ps(fn, _mm512_set1_ps(0.693359375f), xv);
  r = (vf)_mm512_fnmadd_ps(fn, _mm512_set1_ps(-2.12194440e-4f), (__m512)r);
  const vf p = exp_poly(r);
  return (vf)_mm512_maskz_scalef_ps(normal, (__m512)p, fn);
}
#else
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
  const vf p = exp_poly(r);
  const vu scale = ((vu)n + 127u) << 23;
  const vf res = p * as_f(scale);
  return underflow ? splat(0.f) : res;
}
#endif

// exp(x) for x <= 88 (the kernels' x - max), with fewer multiplies: the AVX-512 sweeps are
// bound by the two FMA pipes, and vexp spends 11 of its operations there, this 7.  x = (16 n +
// k) ln2/16 + r with |r| <= ln2/32: exp(x) = 2^n 2^(k/16) exp(r), 2^(k/16) from a 16-entry
// table in a register (one vpermps), exp(r) to degree 3 (truncation 1e-8 relative), 2^n added
// into the exponent bits.  Maximum error against exp in float64 over [-87.3, 88]: 2 ulp
// (tests/test_extreme.py checks it).  Below -87.33 it returns 0; NaN stays NaN.
#if defined(XENT_VEC_AVX512)
inline vf vexp_fast(vf x) {
  const __m512 xv = (__m512)x;
  const __mmask16 normal = _mm512_cmp_ps_mask(xv, _mm512_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m512 magic = _mm512_set1_ps(12582912.f);  // 1.5 * 2^23: its low bits take the integer
  const __m512 kf = _mm512_fmadd_ps(xv, _mm512_set1_ps(23.0831206542234f), magic);  // 16 / ln2
  const __m512 fn = _mm512_sub_ps(kf, magic);
  __m512 r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(0.0433197021484375f), xv);  // fn * hi exact
  r = _mm512_fnmadd_ps(fn, _mm512_set1_ps(1.9966365590803890e-06f), r);
  const __m512 table =
      _mm512_setr_ps(1.000000000e+00f, 1.044273782e+00f, 1.090507733e+00f, 1.138788635e+00f,
                     1.189207115e+00f, 1.241857812e+00f, 1.296839555e+00f, 1.354255547e+00f,
                     1.414213562e+00f, 1.476826146e+00f, 1.542210825e+00f, 1.610490332e+00f,
                     1.681792831e+00f, 1.756252160e+00f, 1.834008086e+00f, 1.915206561e+00f);
  const __m512i ki = _mm512_castps_si512(kf);
  const __m512 t = _mm512_permutexvar_ps(ki, table);  // index: the low 4 bits, k = fn mod 16
  // exp(r) = 1 + r q, q = 1 + r/2 + r^2/6; t exp(r) = t + (t r) q.
  const __m512 q = _mm512_fmadd_ps(
      _mm512_fmadd_ps(_mm512_set1_ps(1.f / 6.f), r, _mm512_set1_ps(0.5f)), r, _mm512_set1_ps(1.f));
  const __m512 y = _mm512_fmadd_ps(_mm512_mul_ps(t, r), q, t);
  // (fn >> 4) << 23 from kf's bits: the magic's own bits all shift out.
  const __m512i scale =
      _mm512_and_si512(_mm512_slli_epi32(ki, 19), _mm512_set1_epi32(static_cast<int>(0xff800000u)));
  const __m512 res = _mm512_castsi512_ps(_mm512_add_epi32(_mm512_castps_si512(y), scale));
  // + (x - x): 0, or NaN for NaN (whose bits the exponent add may have changed).
  return (vf)_mm512_maskz_add_ps(normal, res, _mm512_sub_ps(xv, xv));
}
#elif defined(XENT_VEC_AVX2)
// AVX2: the same with an 8-entry table (one vpermps on 8 lanes): |r| <= ln2/16, so exp(r) to
// degree 4; no mask registers, so the lanes below the normal range are cleared with an and.
inline vf vexp_fast(vf x) {
  const __m256 xv = (__m256)x;
  const __m256 normal = _mm256_cmp_ps(xv, _mm256_set1_ps(-87.33654f), _CMP_NLT_UQ);
  const __m256 magic = _mm256_set1_ps(12582912.f);
  const __m256 kf = _mm256_fmadd_ps(xv, _mm256_set1_ps(11.541560327111707f), magic);  // 8 / ln2
  const __m256 fn = _mm256_sub_ps(kf, magic);
  __m256 r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(0.08660888671875f), xv);  // fn * hi exact
  r = _mm256_fnmadd_ps(fn, _mm256_set1_ps(3.451085124316078e-05f), r);
  const __m256 table =
      _mm256_setr_ps(1.000000000e+00f, 1.090507733e+00f, 1.189207115e+00f, 1.296839555e+00f,
                     1.414213562e+00f, 1.542210825e+00f, 1.681792831e+00f, 1.834008086e+00f);
  const __m256i ki = _mm256_castps_si256(kf);
  const __m256 t = _mm256_permutevar8x32_ps(table, ki);  // index: the low 3 bits
  // exp(r) = 1 + r q, q = 1 + r/2 + r^2/6 + r^3/24; t exp(r) = t + (t r) q.
  __m256 q = _mm256_fmadd_ps(_mm256_set1_ps(1.f / 24.f), r, _mm256_set1_ps(1.f / 6.f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(0.5f));
  q = _mm256_fmadd_ps(q, r, _mm256_set1_ps(1.f));
  const __m256 y = _mm256_fmadd_ps(_mm256_mul_ps(t, r), q, t);
  const __m256i scale =
      _mm256_and_si256(_mm256_slli_epi32(ki, 20), _mm256_set1_epi32(static_cast<int>(0xff800000u)));
  const __m256 res = _mm256_castsi256_ps(_mm256_add_epi32(_mm256_castps_si256(y), scale));
  return (vf)_mm256_and_ps(_mm256_add_ps(res, _mm256_sub_ps(xv, xv)), normal);
}
#else
inline vf vexp_fast(vf x) {
  return vexp(x);
}
#endif

// log(x) for positive normal float32 lanes: x = 2^e m with m in [sqrt(1/2), sqrt(2)), and the
// Cephes polynomial for log(1 + f), f = m - 1.  Maximum error against log in float64 over the
// positive normal range: 1 ulp (tests/test_extreme.py checks it).  NaN stays NaN; +inf, 0 and
// subnormals give finite values: the kernels only pass sums of exps, which are >= 1 in a live
// row (its max contributes exp(0)) and whose lse is -inf anyway when they are 0.
inline vf vlog(vf x) {
  const vu bits = as_u(x);
  vi e = (vi)(bits >> 23) - 127;
  vf m = as_f((bits & 0x007fffffu) | 0x3f800000u);  // [1, 2)
  const vi big = m > 1.41421356f;                   // lanes are -1 where true
  m = big ? m * 0.5f : m;
  e -= big;
  const vf f = m - 1.f, z = f * f;
  const vf ef = __builtin_convertvector(e, vf);
  vf y = splat(7.0376836292e-2f);
  y = y * f - 1.1514610310e-1f;
  y = y * f + 1.1676998740e-1f;
  y = y * f - 1.2420140846e-1f;
  y = y * f + 1.4249322787e-1f;
  y = y * f - 1.6668057665e-1f;
  y = y * f + 2.0000714765e-1f;
  y = y * f - 2.4999993993e-1f;
  y = y * f + 3.3333331174e-1f;
  y = y * f * z + ef * -2.12194440e-4f - 0.5f * z;
  return (f + y + ef * 0.693359375f) + (x - x);  // x - x: 0, or NaN for NaN
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
#if defined(XENT_VEC_AVX512)
  return (vf)_mm512_cvtph_ps((__m256i)h16);  // F16C: exact, subnormals, inf and NaN included
#elif defined(XENT_VEC_AVX2)
  return (vf)_mm256_cvtph_ps((__m128i)h16);
#endif
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
#if defined(XENT_VEC_AVX512)
  // One widening move: GCC splits __builtin_convertvector here into four instructions.
  return (vf)_mm512_slli_epi32(_mm512_cvtepu16_epi32((__m256i)h), 16);
#elif defined(XENT_VEC_AVX2)
  return (vf)_mm256_slli_epi32(_mm256_cvtepu16_epi32((__m128i)h), 16);
#else
  return as_f(__builtin_convertvector(h, vu) << 16);
#endif
}

// 2W bfloat16 values as two float32 vectors, in an order other than memory's (interleaves
// within 128-bit lanes): for sums and maxima, which do not care.
inline void bf16_pair_any_order(const uint16_t* p, vf* lo, vf* hi) {
#if defined(XENT_VEC_AVX512)
  const __m512i raw = _mm512_loadu_si512(p);
  *lo = (vf)_mm512_unpacklo_epi16(_mm512_setzero_si512(), raw);
  *hi = (vf)_mm512_unpackhi_epi16(_mm512_setzero_si512(), raw);
#elif defined(XENT_VEC_AVX2)
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  *lo = (vf)_mm256_unpacklo_epi16(_mm256_setzero_si256(), raw);
  *hi = (vf)_mm256_unpackhi_epi16(_mm256_setzero_si256(), raw);
#else
  *lo = bf2f(*reinterpret_cast<const vh_mem*>(p));
  *hi = bf2f(*reinterpret_cast<const vh_mem*>(p + W));
#endif
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
  static vf load(const float* p) { return *reinterpret_cast<const vf_mem*>(p); }
  static void store(float* p, vf v) { *reinterpret_cast<vf_mem*>(p) = v; }
  static float neg_inf() { return -__builtin_inff(); }
};
template <>
struct Io<Dtype::bf16> {
  using elem = uint16_t;
  static vf load(const uint16_t* p) { return bf2f(*reinterpret_cast<const vh_mem*>(p)); }
  static void store(uint16_t* p, vf v) { *reinterpret_cast<vh_mem*>(p) = f2bf(v); }
  static uint16_t neg_inf() { return 0xff80u; }
};
template <>
struct Io<Dtype::f16> {
  using elem = uint16_t;
  static vf load(const uint16_t* p) { return h2f(*reinterpret_cast<const vh_mem*>(p)); }
  static void store(uint16_t* p, vf v) { *reinterpret_cast<vh_mem*>(p) = f2h(v); }
  static uint16_t neg_inf() { return 0xfc00u; }
};

// A streaming (non-temporal) store of W elements to an address aligned to W elements: the
// gradient is written once and read much later, so it need not be read into the cache first.
template <Dtype D>
inline void store_stream(typename Io<D>::elem* p, vf v) {
#if defined(XENT_VEC_AVX512)
  if constexpr (D == Dtype::f32) {
    _mm512_stream_ps(p, (__m512)v);
  } else {
    _mm256_stream_si256(reinterpret_cast<__m256i*>(p),
                        (__m256i)(D == Dtype::bf16 ? f2bf(v) : f2h(v)));
  }
#elif defined(XENT_VEC_AVX2)
  if constexpr (D == Dtype::f32) {
    _mm256_stream_ps(p, (__m256)v);
  } else {
    _mm_stream_si128(reinterpret_cast<__m128i*>(p), (__m128i)(D == Dtype::bf16 ? f2bf(v) : f2h(v)));
  }
#else
  Io<D>::store(p, v);
#endif
}

// The last n < W elements, padded with -inf (which every kernel here treats as "absent").
template <Dtype D>
inline vf load_tail(const typename Io<D>::elem* p, int64_t n) {
#if defined(XENT_VEC_AVX512)
  // Masked loads: no bytes past the row are touched, and no copy through the stack.
  const __mmask16 m = static_cast<__mmask16>((1u << n) - 1u);
  if constexpr (D == Dtype::f32) {
    return (vf)_mm512_mask_loadu_ps(_mm512_set1_ps(-__builtin_inff()), m, p);
  } else {
    const __m256i h = _mm256_mask_loadu_epi16(_mm256_set1_epi16((short)Io<D>::neg_inf()), m, p);
    return D == Dtype::bf16 ? bf2f((vh)h) : h2f((vh)h);
  }
#endif
  typename Io<D>::elem buf[W];
  for (int i = 0; i < W; ++i) buf[i] = Io<D>::neg_inf();
  __builtin_memcpy(buf, p, n * sizeof(buf[0]));
  return Io<D>::load(buf);
}

inline vf load_w(const float* w, int64_t i, int64_t n_left) {
  if (w == nullptr) return splat(1.f);
  if (n_left >= W) return Io<Dtype::f32>::load(w + i);
#if defined(XENT_VEC_AVX512)
  return (vf)_mm512_maskz_loadu_ps(static_cast<__mmask16>((1u << n_left) - 1u), w + i);
#endif
  float buf[W] = {};
  __builtin_memcpy(buf, w + i, n_left * sizeof(float));
  return Io<Dtype::f32>::load(buf);
}

// What happens to a logit before the softmax, fixed per call so that the common case (no
// scale, no softcap) costs no instruction per element.
enum class Tf : int { plain, scaled, capped };

template <Tf K>
struct TfTag {
  static constexpr Tf value = K;
};

template <bool B>
struct BoolTag {
  static constexpr bool value = B;
};

// Calls f(TfTag<K>{}) with the K of t: one instantiation per kind of transform.
template <typename F>
inline auto with_tf(VecTransform t, F&& f) {
  if (t.softcap > 0.f) return f(TfTag<Tf::capped>{});
  if (t.scale != 1.f) return f(TfTag<Tf::scaled>{});
  return f(TfTag<Tf::plain>{});
}

// -inf (masked entries, and the padding of ragged tails) stays -inf, as in xent_row.h (a
// scale of 0 or below would turn it into NaN or +inf).
template <Tf K>
inline vf transform(vf x, VecTransform t) {
  if constexpr (K == Tf::plain) return x;
  const vf y = K == Tf::capped ? vtanh(x * (t.scale / t.softcap)) * t.softcap : x * t.scale;
  return x == -__builtin_inff() ? x : y;
}

// T'(x), the factor the gradient of the transformed logit picks up.
template <Tf K>
inline vf slope(vf x, VecTransform t) {
  if constexpr (K == Tf::plain) return splat(1.f);
  if constexpr (K == Tf::scaled) return splat(t.scale);
  const vf th = vtanh(x * (t.scale / t.softcap));
  const vf s = (1.f - th * th) * t.scale;
  return x == -__builtin_inff() ? splat(0.f) : s;
}

// ----- the row kernels ----------------------------------------------------------------------
template <Dtype D>
inline vf load_any(const typename Io<D>::elem* p, int64_t left) {
  return left >= W ? Io<D>::load(p) : load_tail<D>(p, left);
}

inline void store_tail_f32(float* p, vf v, int64_t left) {
  if (left >= W) {
    Io<Dtype::f32>::store(p, v);
  } else {
    float buf[W];
    Io<Dtype::f32>::store(buf, v);
    __builtin_memcpy(p, buf, left * sizeof(float));
  }
}

// Exps are taken against a reference value that may lag the running max by up to this much:
// exp(y - reference) <= e^64 ~ 6e27, so a row of up to 5e10 of them still sums below FLT_MAX.
constexpr float kRefSlack = 64.f;

// The chunk loop of the row sweeps, float32 and float64 alike.  sweep(c0, c1, r, &sum) sweeps
// elements [c0, c1) against the reference r and returns their max; when that max lies more
// than kRefSlack above the reference (or above a -inf one), the reference rises to it, the
// sum so far is rescaled and the chunk swept again.  done(chunk, r) then takes what the last
// sweep of the chunk left (its dot terms, the reference its kept exps are relative to).  The
// reference never falls, so the chunks' references rise from one chunk to the next.
template <typename T, typename Sweep, typename Done>
void sweep_chunks(int64_t n, T* run_ref, T* run_sum, Sweep&& sweep, Done&& done) {
  const T ninf = -__builtin_inf();
  for (int64_t c0 = 0, chunk = 0; c0 < n; c0 += kVecChunk, ++chunk) {
    const int64_t c1 = c0 + kVecChunk < n ? c0 + kVecChunk : n;
    T csum;
    const T cmax = sweep(c0, c1, *run_ref, &csum);
    if (cmax > *run_ref && (*run_ref == ninf || cmax - *run_ref > T(kRefSlack))) {
      *run_sum = *run_ref == ninf ? T(0) : *run_sum * scalar_exp(*run_ref - cmax);
      *run_ref = cmax;
      sweep(c0, c1, *run_ref, &csum);
    }
    *run_sum += csum;
    done(chunk, *run_ref);
  }
}

// A row's smoothing sums, sum_j w_j (y_j - ref) and sum_j w_j, from its chunks' (each relative to
// its chunk's reference r, which only rises): kept relative to the latest r and moved by
// w * (r_old - r_new) when it rises; terms taken while r was -inf (w_j * -inf) need no move.
// The chunk-level form of xent_row.h's DotAcc / dot_move (this file includes no library header).
template <typename T>
struct ChunkDots {
  T ref = -__builtin_inf();
  T dot = 0;
  T w = 0;
  void add(T r, T chunk_dot, T chunk_w) {
    if (r != ref) {
      if (ref != -__builtin_inf()) dot += w * (ref - r);
      ref = r;
    }
    dot += chunk_dot;
    w += chunk_w;
  }
};

// One sweep over each chunk: its exps against the row's current reference (a value of the
// row seen so far, so never above its max), and its max.  Only when the chunk's max exceeds
// the reference by more than kRefSlack (the first chunk of a row that starts far below its
// max, a sudden jump) is the reference raised to it, the sum so far rescaled and the chunk,
// now in L1, swept again.  The log-sum-exp is reference + log(sum), whatever the reference.
// kDot: also sum_j w_j (y_j - reference) and sum_j w_j, relative to the final reference (each
// chunk's terms against its own reference, the difference the exp takes anyway; ChunkDots moves
// them).  kKeep: also store exp(y_j - reference) and each chunk's reference, so that the gradient
// pass needs no second exp (plain transform only).
template <Dtype D, Tf K, bool kDot, bool kKeep>
RowStats stats_impl(const void* xv, int64_t n, VecTransform t, const float* w, RowKeep* keep) {
  const auto* x = static_cast<const typename Io<D>::elem*>(xv);
  const float ninf = -__builtin_inff();
  // The first logit as the first reference: within kRefSlack of the max for most rows.
  float run_ref = n > 0 ? transform<K>(load_any<D>(x, n), t)[0] : ninf;
  float run_sum = 0.f;
  ChunkDots<float> dots;
  const vi lane = iota();
  // Sweeps [c0, c1) against r: returns its max, its sum of exps in *csum, its dot terms in
  // cdot and its weights in cw.  With r = -inf, +inf is subtracted instead: exps of 0 (and a
  // NaN kept), where exp(-inf - -inf) would be NaN; a chunk swept so is all -inf (or it is swept
  // again), and its dot terms are w_j * -inf, as they must be.
  vf cdot;
  float cw = 0.f;
  auto sweep = [&](int64_t c0, int64_t c1, float r, float* csum) {
    const vf mv = splat(r != ninf ? r : __builtin_inff());
    vf s0 = splat(0.f), s1 = splat(0.f), m0 = splat(ninf), m1 = splat(ninf);
    vf d = splat(0.f), dw = splat(0.f);
    auto step_y = [&](vf y, int64_t at, vf& acc, vf& mx) {
      mx = vmax(mx, y);
      const vf z = y - mv;
      const vf e = vexp_fast(z);
      acc += e;
      if (kKeep) Io<Dtype::f32>::store(keep->e + at, e);
      if (kDot) {
        const vf wv = load_w(w, at, W);
        d += wv * z;
        if (w != nullptr) dw += wv;
      }
    };
    auto step = [&](int64_t at, vf& acc, vf& mx) {
      step_y(transform<K>(Io<D>::load(x + at), t), at, acc, mx);
    };
    int64_t i = c0;
    for (; i + 2 * W <= c1; i += 2 * W) {
      // Ask for the next chunk while this one computes (prefetches past the row are
      // harmless): the hardware prefetcher alone leaves each chunk's first loads waiting.
      constexpr int64_t kStepBytes = 2 * W * sizeof(typename Io<D>::elem);
      __builtin_prefetch(x + i + kVecChunk);
      if (kStepBytes > 64) __builtin_prefetch(x + i + W + kVecChunk);
      if constexpr (D == Dtype::bf16 && !kKeep && !kDot) {
        // Only the max and the sum are wanted, in any order: 2W values widened by two
        // interleaves with zero (one instruction per vector instead of two).
        vf y0, y1;
        bf16_pair_any_order(x + i, &y0, &y1);
        step_y(transform<K>(y0, t), i, s0, m0);
        step_y(transform<K>(y1, t), i + W, s1, m1);
      } else {
        step(i, s0, m0);
        step(i + W, s1, m1);
      }
    }
    if (i + W <= c1) {
      step(i, s0, m0);
      i += W;
    }
    if (i < c1) {
      const int64_t left = c1 - i;
      const vf y = transform<K>(load_tail<D>(x + i, left), t);
      m1 = vmax(m1, y);  // padded lanes are -inf: no effect on the max, exp gives 0
      const vf e = vexp_fast(y - mv);
      s1 += e;
      if (kKeep) store_tail_f32(keep->e + i, e, left);
      if (kDot) {
        const vf wv = load_w(w, i, left);  // 0 past the row
        const vi in_row = lane < static_cast<int32_t>(left);
        d += in_row ? wv * (y - mv) : splat(0.f);
        if (w != nullptr) dw += wv;
      }
    }
    *csum = hsum(s0 + s1);
    cdot = d;
    if (kDot) cw = w != nullptr ? hsum(dw) : static_cast<float>(c1 - c0);
    return hmax(vmax(m0, m1));
  };
  sweep_chunks(n, &run_ref, &run_sum, sweep, [&](int64_t chunk, float r) {
    if (kKeep) keep->chunk_max[chunk] = r;
    if (kDot) dots.add(r, hsum(cdot), cw);
  });
  // A NaN logit is invisible to max but not to exp(NaN - reference): the sum carries it.
  return RowStats{run_ref, run_sum, kDot ? dots.dot : 0.f, kDot ? dots.w : 0.f};
}

template <Dtype D, Tf K>
void grad_impl(const void* xv, void* gv, int64_t n, VecTransform t, float ref, float a, float b,
               const float* w) {
  const auto* x = static_cast<const typename Io<D>::elem*>(xv);
  auto* g = static_cast<typename Io<D>::elem*>(gv);
  const vf lv = splat(ref);
  for (int64_t i = 0; i < n; i += W) {
    const int64_t left = n - i;
    const vf xi = load_any<D>(x + i, left);
    vf gi = vexp_fast(transform<K>(xi, t) - lv) * a - load_w(w, i, left) * b;
    if constexpr (K != Tf::plain) gi *= slope<K>(xi, t);
    if (left >= W) {
      Io<D>::store(g + i, gi);
    } else {
      typename Io<D>::elem buf[W];
      Io<D>::store(buf, gi);
      __builtin_memcpy(g + i, buf, left * sizeof(buf[0]));
    }
  }
}

// One vector of the gradient from kept exps: f e_j - bs w_j, minus hs at the target lane (if it
// is here).
inline vf kept_vector(vf f, vf e, vf w_bs, int64_t target_lane, float hs) {
  const vf gi = f * e - w_bs;
  if (static_cast<uint64_t>(target_lane) >= static_cast<uint64_t>(W)) return gi;
  return gi - (iota() == static_cast<int32_t>(target_lane) ? splat(hs) : splat(0.f));
}

// The gradient from the exps a stats pass kept: a p_j = a e_j * exp(chunk_max - ref) (a carries
// 1 / sum), minus `hot` at the target, all in float before the one rounding.  `stream`:
// non-temporal stores (for gradients larger than the caches; the caller fences once at the end of
// its task).  The main loop has no call and no ragged tail in it (a call would make the compiler
// reload every vector constant at each step); the last n % W elements go through buffers after it.
template <Dtype D, bool kStream>
void grad_kept_impl(const RowKeep& keep, void* gv, int64_t n, float scale, float ref, float a,
                    float b, const float* w, int64_t target, float hot) {
  auto* g = static_cast<typename Io<D>::elem*>(gv);
  const float* e = keep.e;  // local copies: the stores through g cannot alias them
  const float* chunk_max = keep.chunk_max;
  const float bs = b * scale, hs = hot * scale;
  auto factor = [&](int64_t chunk) {
    const float cm = chunk_max[chunk];
    return splat(cm == -__builtin_inff() ? 0.f : a * scale * scalar_exp(cm - ref));
  };
  const int64_t full = n / W * W;
  for (int64_t c0 = 0, chunk = 0; c0 < full; c0 += kVecChunk, ++chunk) {
    const int64_t c1 = c0 + kVecChunk < full ? c0 + kVecChunk : full;
    const vf f = factor(chunk);
    for (int64_t i = c0; i < c1; i += W) {
      const vf w_bs = w == nullptr ? splat(bs) : Io<Dtype::f32>::load(w + i) * bs;
      const vf gi = kept_vector(f, Io<Dtype::f32>::load(e + i), w_bs, target - i, hs);
      if (kStream) {
        store_stream<D>(g + i, gi);
      } else {
        Io<D>::store(g + i, gi);
      }
    }
  }
  if (full == n) return;
  const int64_t left = n - full;
  float eb[W] = {};
  __builtin_memcpy(eb, e + full, left * sizeof(float));
  const vf gi = kept_vector(factor(full / kVecChunk), Io<Dtype::f32>::load(eb),
                            load_w(w, full, left) * bs, target - full, hs);
  typename Io<D>::elem gb[W];
  Io<D>::store(gb, gi);
  __builtin_memcpy(g + full, gb, left * sizeof(gb[0]));
}

template <Dtype D>
void grad_kept_dt(const RowKeep& keep, void* g, int64_t n, float scale, float ref, float a, float b,
                  const float* w, int64_t target, float hot, bool stream) {
  // Streaming stores need W-element alignment (rows of odd length start anywhere).
  if (stream && reinterpret_cast<uintptr_t>(g) % (W * sizeof(typename Io<D>::elem)) == 0) {
    grad_kept_impl<D, true>(keep, g, n, scale, ref, a, b, w, target, hot);
  } else {
    grad_kept_impl<D, false>(keep, g, n, scale, ref, a, b, w, target, hot);
  }
}

template <Dtype D, Tf K, bool kDot>
RowStats stats_keep(const void* x, int64_t n, VecTransform t, const float* w, RowKeep* keep) {
  if (K != Tf::capped && keep != nullptr) return stats_impl<D, K, kDot, true>(x, n, t, w, keep);
  return stats_impl<D, K, kDot, false>(x, n, t, w, nullptr);
}

template <Dtype D>
RowStats stats_dt(const void* x, int64_t n, VecTransform t, const float* w, bool want_dot,
                  RowKeep* keep) {
  return with_tf(t, [&](auto tf) {
    constexpr Tf K = decltype(tf)::value;
    return want_dot ? stats_keep<D, K, true>(x, n, t, w, keep)
                    : stats_keep<D, K, false>(x, n, t, w, keep);
  });
}

RowStats stats(const void* x, Dtype dt, int64_t n, VecTransform t, const float* w, bool want_dot,
               RowKeep* keep) {
  switch (dt) {
    case Dtype::f16:
      return stats_dt<Dtype::f16>(x, n, t, w, want_dot, keep);
    case Dtype::bf16:
      return stats_dt<Dtype::bf16>(x, n, t, w, want_dot, keep);
    default:
      return stats_dt<Dtype::f32>(x, n, t, w, want_dot, keep);
  }
}

template <Dtype D>
void grad_dt(const void* x, void* g, int64_t n, VecTransform t, float ref, float a, float b,
             const float* w) {
  with_tf(t, [&](auto tf) { grad_impl<D, decltype(tf)::value>(x, g, n, t, ref, a, b, w); });
}

void grad(const void* x, void* g, Dtype dt, int64_t n, VecTransform t, float ref, float a, float b,
          const float* w) {
  switch (dt) {
    case Dtype::f16:
      return grad_dt<Dtype::f16>(x, g, n, t, ref, a, b, w);
    case Dtype::bf16:
      return grad_dt<Dtype::bf16>(x, g, n, t, ref, a, b, w);
    default:
      return grad_dt<Dtype::f32>(x, g, n, t, ref, a, b, w);
  }
}

void grad_kept(const RowKeep& keep, void* g, Dtype dt, int64_t n, float scale, float ref, float a,
               float b, const float* w, int64_t target, float hot, bool stream) {
  switch (dt) {
    case Dtype::f16:
      return grad_kept_dt<Dtype::f16>(keep, g, n, scale, ref, a, b, w, target, hot, stream);
    case Dtype::bf16:
      return grad_kept_dt<Dtype::bf16>(keep, g, n, scale, ref, a, b, w, target, hot, stream);
    default:
      return grad_kept_dt<Dtype::f32>(keep, g, n, scale, ref, a, b, w, target, hot, stream);
  }
}

// ----- one row per lane -----------------------------------------------------------------------
// Lane l of class j; lanes past b.lanes read -inf (absent).  K-dim blocks (lane_stride 1) are a
// plain vector load per class.
template <Dtype D>
inline vf load_lanes(const LaneBlock& b, int64_t j) {
  const auto* x = static_cast<const typename Io<D>::elem*>(b.x) + j * b.class_stride;
  return load_any<D>(x, b.lanes);
}

// Row-major blocks (consecutive short rows): each row is read once with vector loads and its
// transformed logits are transposed into y[j * W + l], so every later sweep is a vector load.
template <Dtype D, Tf K>
void transpose_rows(const LaneBlock& b, VecTransform t, float* y) {
  const auto* x = static_cast<const typename Io<D>::elem*>(b.x);
  const int64_t C = b.num_classes;
  for (int64_t l = 0; l < W; ++l) {
    if (l >= b.lanes) {
      for (int64_t j = 0; j < C; ++j) y[j * W + l] = -__builtin_inff();
      continue;
    }
    for (int64_t j0 = 0; j0 < C; j0 += W) {
      const vf v = transform<K>(load_any<D>(x + l * b.lane_stride + j0, C - j0), t);
      const int64_t n = C - j0 < W ? C - j0 : W;
      for (int64_t i = 0; i < n; ++i) y[(j0 + i) * W + l] = v[i];
    }
  }
}

template <Dtype D>
inline void store_lanes(const LaneBlock& b, int64_t j, vf v) {
  auto* g = static_cast<typename Io<D>::elem*>(b.g) + j * b.class_stride;
  if (b.lane_stride == 1 && b.lanes == W) return Io<D>::store(g, v);
  typename Io<D>::elem buf[W];
  Io<D>::store(buf, v);
  for (int l = 0; l < b.lanes; ++l) g[l * b.lane_stride] = buf[l];
}

inline vf load_f32(const float* p) {
  return Io<Dtype::f32>::load(p);
}

// Transformed logits of class j for every lane: from the transposed copy when there is one.
template <Dtype D, Tf K>
inline vf lanes_y(const LaneBlock& b, int64_t j, VecTransform t, const float* ybuf) {
  return ybuf ? load_f32(ybuf + j * W) : transform<K>(load_lanes<D>(b, j), t);
}

inline vi load_i32(const int32_t* p) {
  vi v;
  __builtin_memcpy(&v, p, sizeof v);
  return v;
}

template <Dtype D, Tf K>
void lanes_stats_impl(const LaneBlock& b, VecTransform t, const float* w, const LaneCoefs& c,
                      const int32_t* target, float* ybuf, const LaneOut& out) {
  const int64_t C = b.num_classes;
  if (ybuf != nullptr) transpose_rows<D, K>(b, t, ybuf);
  const vi tv = load_i32(target);
  const float ninf = -__builtin_inff();
  const vf rv = lanes_y<D, K>(b, 0, t, ybuf);
  // One pass over the classes, as the row sweep: exps against each lane's first logit (+inf
  // where that is -inf: exps of 0, not exp(-inf - -inf) = NaN), the max on the way, and the
  // smoothing sum relative to the same reference.  The target's logit and weight are picked up
  // too (no gather): lanes whose target is -1 never match and keep 0.
  vf ref = rv == ninf ? splat(__builtin_inff()) : rv;
  vf m = splat(ninf), sum = splat(0.f), dot = splat(0.f), y_t = splat(0.f), w_t = splat(0.f);
  for (int64_t j = 0; j < C; ++j) {
    const vf y = lanes_y<D, K>(b, j, t, ybuf);
    const float wj = w ? w[j] : 1.f;
    m = vmax(m, y);
    const vf z = y - ref;
    sum += vexp_fast(z);
    if (c.smooth) dot += wj * z;
    const vi hit = tv == static_cast<int32_t>(j);
    y_t = hit ? y : y_t;
    w_t = hit ? splat(wj) : w_t;
  }
  // Lanes whose max lies more than kRefSlack above their first logit (or above a first -inf):
  // the whole block's exps (and smoothing sums) again, against each lane's max.  Rare: a row
  // must start far below its max.
  const vi redo = (m > rv) & ((rv == ninf) | (m - rv > kRefSlack));
  int any_redo = 0;
  for (int l = 0; l < W; ++l) any_redo |= redo[l];
  if (any_redo) {
    ref = redo ? m : ref;
    sum = splat(0.f);
    dot = splat(0.f);
    for (int64_t j = 0; j < C; ++j) {
      const vf z = lanes_y<D, K>(b, j, t, ybuf) - ref;
      sum += vexp_fast(z);
      if (c.smooth) dot += (w ? w[j] : 1.f) * z;
    }
  }
  // The normaliser, xent_row.h's RowNorm lane by lane: an all -inf lane has reference and
  // log_sum -inf (its loss and gradient come out NaN, as torch's); a NaN or +inf logit reaches
  // log_sum through the sum.
  const vi dead = m == ninf;
  ref = dead ? m : ref;
  const vf log_sum = dead ? m : vlog(sum);
  const vf lse = ref + log_sum;
  // xent_row.h, index_row_loss and index_grad_coef, lane by lane.
  const vi valid = tv >= 0;
  vf loss = c.one_minus_eps * w_t * ((ref - y_t) + log_sum);
  vf big_a = c.one_minus_eps * w_t;
  if (c.smooth) {
    loss += c.eps_per_class * (c.w_sum * log_sum - dot);
    big_a += c.eps_per_class * c.w_sum;
  }
  if (c.z_loss > 0.f) {
    loss += c.z_loss * lse * lse;
    big_a += 2.f * c.z_loss * lse;
  }
  // 1 / sum; an ignored lane keeps 0 * (1 / sum), NaN where its log-probabilities are.
  const vf inv_sum = vexp_fast(-log_sum);
  const vf zero = splat(0.f);
  Io<Dtype::f32>::store(out.loss, valid ? loss : zero);
  Io<Dtype::f32>::store(out.lse, lse);
  Io<Dtype::f32>::store(out.ref, ref);
  Io<Dtype::f32>::store(out.a, (valid ? c.scale * big_a : zero) * inv_sum);
  Io<Dtype::f32>::store(out.b, valid ? splat(c.scale * c.eps_per_class) : zero);
  Io<Dtype::f32>::store(out.hot, valid ? c.scale * c.one_minus_eps * w_t : zero);
}

template <Dtype D, Tf K>
void lanes_grad_impl(const LaneBlock& b, VecTransform t, const float* w, const float* ybuf,
                     const float* ref, const float* a, const float* bw, const float* hot,
                     const int32_t* target) {
  const vf lv = load_f32(ref), av = load_f32(a), bv = load_f32(bw), hv = load_f32(hot);
  const vi tv = load_i32(target);
  for (int64_t j = 0; j < b.num_classes; ++j) {
    const vf onehot = tv == static_cast<int32_t>(j) ? hv : splat(0.f);
    vf y, d;
    if (ybuf != nullptr) {
      // T'(x) from y: scale, or scale * (1 - tanh^2) with tanh = y / softcap.
      y = load_f32(ybuf + j * W);
      const vf th = y * (1.f / t.softcap);
      d = K == Tf::capped ? (y == -__builtin_inff() ? splat(0.f) : (1.f - th * th) * t.scale)
                          : splat(t.scale);
    } else {
      const vf xj = load_lanes<D>(b, j);
      y = transform<K>(xj, t);
      d = slope<K>(xj, t);
    }
    vf g = vexp_fast(y - lv) * av - bv * (w ? w[j] : 1.f) - onehot;
    if constexpr (K != Tf::plain) g *= d;
    store_lanes<D>(b, j, g);
  }
}

template <Dtype D>
void lanes_stats_dt(const LaneBlock& b, VecTransform t, const float* w, const LaneCoefs& c,
                    const int32_t* target, float* ybuf, const LaneOut& out) {
  with_tf(
      t, [&](auto tf) { lanes_stats_impl<D, decltype(tf)::value>(b, t, w, c, target, ybuf, out); });
}

void lanes_stats(const LaneBlock& b, Dtype dt, VecTransform t, const float* w, const LaneCoefs& c,
                 const int32_t* target, float* ybuf, const LaneOut& out) {
  switch (dt) {
    case Dtype::f16:
      return lanes_stats_dt<Dtype::f16>(b, t, w, c, target, ybuf, out);
    case Dtype::bf16:
      return lanes_stats_dt<Dtype::bf16>(b, t, w, c, target, ybuf, out);
    default:
      return lanes_stats_dt<Dtype::f32>(b, t, w, c, target, ybuf, out);
  }
}

template <Dtype D>
void lanes_grad_dt(const LaneBlock& b, VecTransform t, const float* w, const float* ybuf,
                   const float* ref, const float* a, const float* bw, const float* hot,
                   const int32_t* target) {
  with_tf(t, [&](auto tf) {
    lanes_grad_impl<D, decltype(tf)::value>(b, t, w, ybuf, ref, a, bw, hot, target);
  });
}

void lanes_grad(const LaneBlock& b, Dtype dt, VecTransform t, const float* w, const float* ybuf,
                const float* ref, const float* a, const float* bw, const float* hot,
                const int32_t* target) {
  switch (dt) {
    case Dtype::f16:
      return lanes_grad_dt<Dtype::f16>(b, t, w, ybuf, ref, a, bw, hot, target);
    case Dtype::bf16:
      return lanes_grad_dt<Dtype::bf16>(b, t, w, ybuf, ref, a, bw, hot, target);
    default:
      return lanes_grad_dt<Dtype::f32>(b, t, w, ybuf, ref, a, bw, hot, target);
  }
}

template <vf (*F)(vf)>
void map_rows(const float* x, float* y, int64_t n) {
  int64_t i = 0;
  for (; i + W <= n; i += W) Io<Dtype::f32>::store(y + i, F(Io<Dtype::f32>::load(x + i)));
  for (; i < n; ++i) {
    float buf[W] = {};
    buf[0] = x[i];
    y[i] = F(Io<Dtype::f32>::load(buf))[0];
  }
}

// ----- float64 rows -----------------------------------------------------------------------
// W / 2 doubles per vector, written with the same vector extensions (the compiler emits the
// instruction set of the pragma), accumulated in float64 as the numerics require.
typedef double vd __attribute__((vector_size(W * 4), aligned(8)));
typedef int64_t vl __attribute__((vector_size(W * 4), aligned(8)));
typedef double vd_mem __attribute__((vector_size(W * 4), aligned(1), may_alias));
constexpr int WD = W / 2;

inline vd splat_d(double v) {
  return vd{} + v;
}
inline vd load_d(const double* p) {
  return *reinterpret_cast<const vd_mem*>(p);
}
inline void store_d(double* p, vd v) {
  *reinterpret_cast<vd_mem*>(p) = v;
}
inline vd vmax_d(vd a, vd b) {
  return a > b ? a : b;
}
inline double hmax_d(vd v) {
  double m = v[0];
  for (int i = 1; i < WD; ++i) m = v[i] > m ? v[i] : m;
  return m;
}
inline double hsum_d(vd v) {
  double s = 0;
  for (int i = 0; i < WD; ++i) s += v[i];
  return s;
}

// exp(x) for float64 lanes, x <= 700: x = n ln2 + r, |r| <= ln2/2 (fdlibm's two-part ln2, so
// n ln2_hi is exact), and the Taylor series of exp(r) to degree 13 (truncation 4e-18
// relative); 2^n added into the exponent bits.  Below -708.39 (subnormal results) it returns
// 0; NaN stays NaN.  Maximum error against exp in long double: tested in test_extreme.py.
inline vd vexp_d(vd x) {
  const vl under = x < -708.3964185322641;
  const vd magic = splat_d(6755399441055744.0);  // 1.5 * 2^52: its low bits take the integer
  const vd kf = x * 1.4426950408889634 + magic;
  const vd fn = kf - magic;
  vd r = x - fn * 6.93147180369123816490e-01;
  r = r - fn * 1.90821492927058770002e-10;
  constexpr double kInvFact[] = {1.0 / 6227020800.0, 1.0 / 479001600.0, 1.0 / 39916800.0,
                                 1.0 / 3628800.0,    1.0 / 362880.0,    1.0 / 40320.0,
                                 1.0 / 5040.0,       1.0 / 720.0,       1.0 / 120.0,
                                 1.0 / 24.0,         1.0 / 6.0,         0.5};
  vd p = splat_d(kInvFact[0]);
  for (int k = 1; k < 12; ++k) p = p * r + kInvFact[k];
  p = (p * r + 1.0) * r + 1.0;
  const vl n = (vl)kf - (vl)magic;
  const vd res = (vd)((vl)p + (n << 52)) + (x - x);  // x - x: 0, or NaN for NaN
  return under ? splat_d(0.0) : res;
}

template <bool kScaled>
inline vd transform_d(vd x, double scale) {
  if constexpr (!kScaled) return x;
  return x == -__builtin_inf() ? x : x * scale;
}

// The last n < WD elements, padded with -inf.
inline vd load_tail_d(const double* p, int64_t n) {
  double buf[WD];
  for (int i = 0; i < WD; ++i) buf[i] = i < n ? p[i] : -__builtin_inf();
  return load_d(buf);
}

inline vd load_w_d(const double* w, int64_t i, int64_t n_left) {
  if (w == nullptr) return splat_d(1.0);
  if (n_left >= WD) return load_d(w + i);
  double buf[WD] = {};
  for (int l = 0; l < n_left; ++l) buf[l] = w[i + l];
  return load_d(buf);
}

// stats_impl for float64: one sweep per chunk against a lagging reference (see there).
template <bool kScaled, bool kDot, bool kKeep>
RowStatsD stats_f64_impl(const double* x, int64_t n, double scale, const double* w,
                         RowKeepD* keep) {
  const double ninf = -__builtin_inf();
  double run_ref = n > 0 ? transform_d<kScaled>(load_tail_d(x, 1), scale)[0] : ninf;
  double run_sum = 0;
  ChunkDots<double> dots;
  vd cdot, cw;
  auto sweep = [&](int64_t c0, int64_t c1, double r, double* csum) {
    const vd mv = splat_d(r != ninf ? r : __builtin_inf());
    vd s0 = splat_d(0), s1 = splat_d(0), m0 = splat_d(ninf), m1 = splat_d(ninf), d = splat_d(0);
    vd dw = splat_d(0);
    auto step = [&](vd y, int64_t at, int64_t left, vd& acc, vd& mx) {
      mx = vmax_d(mx, y);
      const vd e = vexp_d(y - mv);
      acc += e;
      if (kKeep) {
        if (left >= WD) {
          store_d(keep->e + at, e);
        } else {
          for (int l = 0; l < left; ++l) keep->e[at + l] = e[l];
        }
      }
      if (kDot) {
        const vd wv = load_w_d(w, at, left);
        const vd dd = wv * (y - mv);
        for (int l = 0; l < WD; ++l) {
          d[l] += l < left ? dd[l] : 0.0;
          dw[l] += l < left ? wv[l] : 0.0;
        }
      }
    };
    int64_t i = c0;
    for (; i + 2 * WD <= c1; i += 2 * WD) {
      __builtin_prefetch(x + i + kVecChunk);
      step(transform_d<kScaled>(load_d(x + i), scale), i, WD, s0, m0);
      step(transform_d<kScaled>(load_d(x + i + WD), scale), i + WD, WD, s1, m1);
    }
    for (; i < c1; i += WD) {
      const int64_t left = c1 - i;
      const vd xi = left >= WD ? load_d(x + i) : load_tail_d(x + i, left);
      step(transform_d<kScaled>(xi, scale), i, left, s0, m0);
    }
    *csum = hsum_d(s0 + s1);
    cdot = d;
    cw = dw;
    return hmax_d(vmax_d(m0, m1));
  };
  sweep_chunks(n, &run_ref, &run_sum, sweep, [&](int64_t chunk, double r) {
    if (kKeep) keep->chunk_max[chunk] = r;
    if (kDot) dots.add(r, hsum_d(cdot), hsum_d(cw));
  });
  return RowStatsD{run_ref, run_sum, kDot ? dots.dot : 0.0, kDot ? dots.w : 0.0};
}

RowStatsD stats_f64(const double* x, int64_t n, double scale, const double* w, bool want_dot,
                    RowKeepD* keep) {
  auto go = [&](auto scaled, auto dot) {
    constexpr bool kS = decltype(scaled)::value, kD = decltype(dot)::value;
    return keep != nullptr ? stats_f64_impl<kS, kD, true>(x, n, scale, w, keep)
                           : stats_f64_impl<kS, kD, false>(x, n, scale, w, nullptr);
  };
  using T = BoolTag<true>;
  using F = BoolTag<false>;
  if (scale != 1.0) return want_dot ? go(T{}, T{}) : go(T{}, F{});
  return want_dot ? go(F{}, T{}) : go(F{}, F{});
}

inline void store_fence() {
#if defined(XENT_VEC_AVX512) || defined(XENT_VEC_AVX2)
  _mm_sfence();
#endif
}

// A streaming store of one vector to an address aligned to its size (see store_stream).
inline void store_stream_d(double* p, vd v) {
#if defined(XENT_VEC_AVX512)
  _mm512_stream_pd(p, (__m512d)v);
#elif defined(XENT_VEC_AVX2)
  _mm256_stream_pd(p, (__m256d)v);
#else
  store_d(p, v);
#endif
}

// grad_kept_impl for float64.
template <bool kStream>
void grad_kept_f64_impl(const RowKeepD& keep, double* g, int64_t n, double scale, double ref,
                        double a, double b, const double* w, int64_t target, double hot) {
  const double* e = keep.e;
  const double bs = b * scale, hs = hot * scale;
  for (int64_t c0 = 0, chunk = 0; c0 < n; c0 += kVecChunk, ++chunk) {
    const int64_t c1 = c0 + kVecChunk < n ? c0 + kVecChunk : n;
    const double cm = keep.chunk_max[chunk];
    const vd f = splat_d(cm == -__builtin_inf() ? 0.0 : a * scale * __builtin_exp(cm - ref));
    int64_t i = c0;
    for (; i + WD <= c1; i += WD) {
      const vd w_bs = w == nullptr ? splat_d(bs) : load_d(w + i) * bs;
      if (kStream) {
        store_stream_d(g + i, f * load_d(e + i) - w_bs);
      } else {
        store_d(g + i, f * load_d(e + i) - w_bs);
      }
    }
    for (; i < c1; ++i) g[i] = f[0] * e[i] - (w == nullptr ? bs : w[i] * bs);
  }
  if (kStream) store_fence();  // the streamed line of the target is written back first
  if (target >= 0 && target < n) g[target] -= hs;
}

void grad_kept_f64(const RowKeepD& keep, double* g, int64_t n, double scale, double ref, double a,
                   double b, const double* w, int64_t target, double hot, bool stream) {
  if (stream && reinterpret_cast<uintptr_t>(g) % (W * 4) == 0) {
    grad_kept_f64_impl<true>(keep, g, n, scale, ref, a, b, w, target, hot);
  } else {
    grad_kept_f64_impl<false>(keep, g, n, scale, ref, a, b, w, target, hot);
  }
}

void exp_f64_rows(const double* x, double* y, int64_t n) {
  int64_t i = 0;
  for (; i + WD <= n; i += WD) store_d(y + i, vexp_d(load_d(x + i)));
  for (; i < n; ++i) y[i] = vexp_d(load_tail_d(x + i, 1))[0];
}

}  // namespace

#define XENT_STR2(x) #x
#define XENT_STR(x) XENT_STR2(x)
const VecKernels table = {XENT_STR(XENT_ISA_NS),
                          W,
                          &stats,
                          &grad,
                          &grad_kept,
                          &lanes_stats,
                          &lanes_grad,
                          &map_rows<vexp>,
                          &map_rows<vexp_fast>,
                          &stats_f64,
                          &grad_kept_f64,
                          &exp_f64_rows,
                          &map_rows<vlog>};

}  // namespace XENT_ISA_NS
}  // namespace xent_cpu
