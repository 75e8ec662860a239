// jinfer's CPU kernels, called from XLA:CPU programs through the XLA FFI (jinfer/cpu_kernels.py
// builds this file with the system's C++ compiler on first use and registers its handlers).
//
// jinfer_bf16_matvec: y[m, k] = x[m, c] . w[k, c]^T for any rows m (jinfer calls it for one),
// with bfloat16 weights held output-major (each output's c weights contiguous) and float32 x
// and y. x is rounded to bfloat16 first (round to nearest even) and the bfloat16 products are
// accumulated in float32: the numerics of jinfer's mixed product (`layers.mixed`), summed in
// another order.
//
// Why: XLA:CPU runs a decode step's one-row products at 10-16 GB/s of weight bytes (its YNNPACK
// kernels are built for many rows); this loop reads each weight row once with AVX512-BF16 dot
// products, split over XLA's intra-op threads (2-5x XLA's speed per product, 1.5x over a whole
// step's products: scripts/bench_matvec.py --kernel).
//
// Needs AVX-512F/BW and AVX512_BF16 (compiled with -mavx512f -mavx512bw -mavx512bf16); the
// Python side uses it only on CPUs that report them.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int64_t kChunk = 64;            // weight rows per task
// Software prefetch of the weight rows one group (4 rows) ahead: one core keeps too few cache
// misses in flight on its own to stream the weights at the memory's rate (scripts/bench_matvec.py
// --kernel: a whole step's products 1.6x faster with it on a 2-core Xeon VM).
constexpr int64_t kPrefetchRows = 4;
constexpr int64_t kSerialBytes = 1 << 16; // below this many weight bytes, one thread

inline float BF16ToFloat(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// Round-to-nearest-even float32 -> bfloat16 (NaN stays NaN), as XLA's convert does.
inline uint16_t FloatToBF16(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  if ((bits & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((bits >> 16) | 0x40);
  bits += 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>(bits >> 16);
}

// Rows [0, R) of x against weight rows [n0, n1): four weight rows at a time, each read once for
// all R rows, 32 bfloat16 values per AVX512-BF16 dot product.
template <int R>
void Block(const uint16_t* x, const uint16_t* w, float* y, int64_t c, int64_t k, int64_t n0,
           int64_t n1) {
  const int64_t c32 = c & ~int64_t{31};
  int64_t n = n0;
  for (; n + 4 <= n1; n += 4) {
    __m512 acc[R][4];
    for (int r = 0; r < R; ++r)
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
    const uint16_t* wn = w + n * c;
    for (int64_t i = 0; i < c32; i += 32) {
      __m512bh wv[4];
      for (int j = 0; j < 4; ++j) {
        // An address, not a pointer: the rows ahead may lie past the end of w (a prefetch never faults).
        _mm_prefetch(reinterpret_cast<const char*>(reinterpret_cast<uintptr_t>(wn + j * c + i) +
                                                   kPrefetchRows * c * sizeof(uint16_t)),
                     _MM_HINT_T0);
        wv[j] = (__m512bh)_mm512_loadu_si512(wn + j * c + i);
      }
      for (int r = 0; r < R; ++r) {
        const __m512bh xv = (__m512bh)_mm512_loadu_si512(x + r * c + i);
        for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_dpbf16_ps(acc[r][j], xv, wv[j]);
      }
    }
    for (int r = 0; r < R; ++r) {
      for (int j = 0; j < 4; ++j) {
        float s = _mm512_reduce_add_ps(acc[r][j]);
        for (int64_t i = c32; i < c; ++i) s += BF16ToFloat(x[r * c + i]) * BF16ToFloat(wn[j * c + i]);
        y[r * k + n + j] = s;
      }
    }
  }
  for (; n < n1; ++n) {
    for (int r = 0; r < R; ++r) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t i = 0; i < c32; i += 32) {
        acc = _mm512_dpbf16_ps(acc, (__m512bh)_mm512_loadu_si512(x + r * c + i),
                               (__m512bh)_mm512_loadu_si512(w + n * c + i));
      }
      float s = _mm512_reduce_add_ps(acc);
      for (int64_t i = c32; i < c; ++i) s += BF16ToFloat(x[r * c + i]) * BF16ToFloat(w[n * c + i]);
      y[r * k + n] = s;
    }
  }
}

void Rows(const uint16_t* x, const uint16_t* w, float* y, int64_t m, int64_t c, int64_t k,
          int64_t n0, int64_t n1) {
  int64_t r = 0;
  for (; r + 4 <= m; r += 4) Block<4>(x + r * c, w, y + r * k, c, k, n0, n1);
  switch (m - r) {
    case 3: Block<3>(x + r * c, w, y + r * k, c, k, n0, n1); break;
    case 2: Block<2>(x + r * c, w, y + r * k, c, k, n0, n1); break;
    case 1: Block<1>(x + r * c, w, y + r * k, c, k, n0, n1); break;
    default: break;
  }
}

// body(0) .. body(tasks - 1), shared by the calling thread and (when `parallel`) the pool's:
// tasks are claimed from a counter, so the caller never waits on a task that has not started (no
// deadlock when the pool is busy), only on tasks another thread is running. A pool task that
// starts after the last one is claimed touches only the shared counter.
struct TaskCounter {
  int64_t tasks;
  std::function<void(int64_t)> body;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void Work() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < tasks;) {
      body(t);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

void ParallelFor(ffi::ThreadPool& pool, int64_t tasks, bool parallel,
                 std::function<void(int64_t)> body) {
  auto counter = std::make_shared<TaskCounter>();
  counter->tasks = tasks;
  counter->body = std::move(body);
  const int64_t threads = parallel ? std::min<int64_t>(pool.num_threads(), tasks) : 1;
  for (int64_t t = 1; t < threads; ++t) pool.Schedule([counter]() { counter->Work(); });
  counter->Work();
  while (counter->done.load(std::memory_order_acquire) < tasks) _mm_pause();
}

ffi::Error Bf16Matvec(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::BF16> w,
                      ffi::ResultBuffer<ffi::F32> y) {
  const auto wd = w.dimensions();
  if (wd.size() != 2) return ffi::Error::InvalidArgument("jinfer_bf16_matvec: w must be [k, c]");
  const int64_t k = wd[0], c = wd[1];
  if (c == 0 || x.element_count() % c != 0 || y->element_count() != x.element_count() / c * k)
    return ffi::Error::InvalidArgument("jinfer_bf16_matvec: x must be [m, c] and y [m, k]");
  const int64_t m = x.element_count() / c, chunks = (k + kChunk - 1) / kChunk;
  const uint16_t* wp = reinterpret_cast<const uint16_t*>(w.untyped_data());
  float* yp = y->typed_data();
  std::vector<uint16_t> xb(x.element_count());
  const float* xf = x.typed_data();
  for (int64_t i = 0; i < x.element_count(); ++i) xb[i] = FloatToBF16(xf[i]);
  ParallelFor(pool, chunks, k * c * 2 >= kSerialBytes, [&](int64_t i) {
    Rows(xb.data(), wp, yp, m, c, k, i * kChunk, std::min(k, (i + 1) * kChunk));
  });
  return ffi::Error::Success();
}

// ---------------------------------------------------------------------------------------------
// jinfer_decode_attention: one query token per row over the blocked KV cache (jinfer.kvcache):
// q [b, k, g, h] float32 (already scaled), cache_k [nb, c, k, h, l], cache_v [nb, c, k, l, h]
// float32, positions [b] int32 (the query's position; negative: a padding row, output zeros),
// rows [b] int32 (the cache row each query row reads) -> [b, k, g, h]. Attrs: softcap (0: none),
// window (0: none; else keys at p - j < window only). Each (row, kv head) is one task: its scores
// over positions start .. p (keys read once for the g query heads of the group, 16 positions per
// vector), a softmax in float32, then the values read once. A row's result depends only on its
// own query and cache row: not on its companions, nor on the batch size.

// exp(x) for x <= 0 (softmax arguments), float32: 2^n * P(r) with a degree-6 polynomial on
// |r| <= ln2/2; relative error ~2e-7; underflows to 0 below -87.
inline __m512 ExpNonPositive(__m512 x) {
  const __m512 log2e = _mm512_set1_ps(1.44269504088896341f);
  const __m512 ln2_hi = _mm512_set1_ps(0.693359375f), ln2_lo = _mm512_set1_ps(-2.12194440e-4f);
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, log2e), _MM_FROUND_TO_NEAREST_INT);
  __m512 r = _mm512_fnmadd_ps(n, ln2_hi, x);
  r = _mm512_fnmadd_ps(n, ln2_lo, r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 Tanh(__m512 x) {  // via exp: tanh(x) = sign(x) (1 - e) / (1 + e), e = exp(-2|x|)
  const __m512 ax = _mm512_abs_ps(x);
  const __m512 e = ExpNonPositive(_mm512_mul_ps(ax, _mm512_set1_ps(-2.0f)));
  const __m512 one = _mm512_set1_ps(1.0f);
  const __m512 t = _mm512_div_ps(_mm512_sub_ps(one, e), _mm512_add_ps(one, e));
  return _mm512_castsi512_ps(_mm512_or_si512(
      _mm512_castps_si512(t),
      _mm512_and_si512(_mm512_castps_si512(x), _mm512_set1_epi32(static_cast<int>(0x80000000u)))));
}

struct AttentionShape {
  int64_t b, k, g, h, nb, c, l;
  float softcap;
  int64_t window;
};

constexpr int kMaxGroup = 16;

void AttendOne(const AttentionShape& s, const float* q, const float* ck, const float* cv,
               int32_t position, int32_t row, float* out, std::vector<float>& scores) {
  const int64_t g = s.g, h = s.h, l = s.l;
  if (position < 0 || row < 0 || row >= s.c || g > kMaxGroup) {
    std::fill(out, out + g * h, 0.0f);
    return;
  }
  const int64_t last = std::min<int64_t>(position, s.nb * l - 1);
  const int64_t start = s.window > 0 ? std::max<int64_t>(0, position - s.window + 1) : 0;
  const int64_t first_block = start / l, end_block = last / l;  // inclusive
  const int64_t span = (end_block - first_block + 1) * l;      // whole blocks; masked by index
  scores.assign(g * span, 0.0f);
  // keys: block [k][h][l] of this row and kv head; scores[gi][j] = sum_d q[gi][d] * K[d][j]
  for (int64_t bi = first_block; bi <= end_block; ++bi) {
    const float* kb = ck + (((bi * s.c + row) * s.k) * h) * l;  // kv head offset added by caller
    float* sb = scores.data() + (bi - first_block) * l;
    for (int64_t o = 0; o < l; o += 16) {
      const __mmask16 m = o + 16 <= l ? __mmask16(0xffff) : __mmask16((1u << (l - o)) - 1);
      __m512 acc[kMaxGroup];
      for (int64_t gi = 0; gi < g; ++gi) acc[gi] = _mm512_setzero_ps();
      for (int64_t d = 0; d < h; ++d) {
        const __m512 kv = _mm512_maskz_loadu_ps(m, kb + d * l + o);
        for (int64_t gi = 0; gi < g; ++gi) acc[gi] = _mm512_fmadd_ps(_mm512_set1_ps(q[gi * h + d]), kv, acc[gi]);
      }
      for (int64_t gi = 0; gi < g; ++gi) _mm512_mask_storeu_ps(sb + gi * span + o, m, acc[gi]);
    }
  }
  // softmax over positions start .. last of each query head
  const int64_t lo = start - first_block * l, hi = last - first_block * l + 1;  // [lo, hi) of span
  for (int64_t gi = 0; gi < g; ++gi) {
    float* sg = scores.data() + gi * span;
    if (s.softcap > 0.0f) {
      const __m512 cap = _mm512_set1_ps(s.softcap), inv = _mm512_set1_ps(1.0f / s.softcap);
      for (int64_t j = lo; j < hi; j += 16) {
        const __mmask16 m = j + 16 <= hi ? __mmask16(0xffff) : __mmask16((1u << (hi - j)) - 1);
        const __m512 v = _mm512_maskz_loadu_ps(m, sg + j);
        _mm512_mask_storeu_ps(sg + j, m, _mm512_mul_ps(cap, Tanh(_mm512_mul_ps(v, inv))));
      }
    }
    __m512 top = _mm512_set1_ps(-INFINITY);
    for (int64_t j = lo; j < hi; j += 16) {
      const __mmask16 m = j + 16 <= hi ? __mmask16(0xffff) : __mmask16((1u << (hi - j)) - 1);
      top = _mm512_mask_max_ps(top, m, top, _mm512_maskz_loadu_ps(m, sg + j));
    }
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(top));
    __m512 total = _mm512_setzero_ps();
    for (int64_t j = lo; j < hi; j += 16) {
      const __mmask16 m = j + 16 <= hi ? __mmask16(0xffff) : __mmask16((1u << (hi - j)) - 1);
      const __m512 e = ExpNonPositive(_mm512_sub_ps(_mm512_maskz_loadu_ps(m, sg + j), mx));
      _mm512_mask_storeu_ps(sg + j, m, e);
      total = _mm512_mask_add_ps(total, m, total, e);
    }
    const float inv_total = 1.0f / _mm512_reduce_add_ps(total);
    for (int64_t j = lo; j < hi; ++j) sg[j] *= inv_total;
  }
  // values: block [k][l][h]; out[gi][d] = sum_j p[gi][j] * V[j][d]
  for (int64_t gi = 0; gi < g; ++gi) std::fill(out + gi * h, out + (gi + 1) * h, 0.0f);
  for (int64_t d0 = 0; d0 < h; d0 += 16) {
    const __mmask16 m = d0 + 16 <= h ? __mmask16(0xffff) : __mmask16((1u << (h - d0)) - 1);
    __m512 acc[kMaxGroup];
    for (int64_t gi = 0; gi < g; ++gi) acc[gi] = _mm512_setzero_ps();
    for (int64_t j = lo; j < hi; ++j) {
      const int64_t pos = first_block * l + j, bi = pos / l, o = pos % l;
      const float* vrow = cv + (((bi * s.c + row) * s.k) * l + o) * h;  // kv head offset by caller
      const __m512 vv = _mm512_maskz_loadu_ps(m, vrow + d0);
      for (int64_t gi = 0; gi < g; ++gi)
        acc[gi] = _mm512_fmadd_ps(_mm512_set1_ps(scores[gi * span + j]), vv, acc[gi]);
    }
    for (int64_t gi = 0; gi < g; ++gi) _mm512_mask_storeu_ps(out + gi * h + d0, m, acc[gi]);
  }
}

ffi::Error DecodeAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> ck,
                           ffi::Buffer<ffi::F32> cv, ffi::Buffer<ffi::S32> positions,
                           ffi::Buffer<ffi::S32> rows, ffi::ResultBuffer<ffi::F32> out,
                           float softcap, int64_t window) {
  const auto qd = q.dimensions(), kd = ck.dimensions(), vd = cv.dimensions();
  if (qd.size() != 4 || kd.size() != 5 || vd.size() != 5)
    return ffi::Error::InvalidArgument("jinfer_decode_attention: q [b,k,g,h], caches rank 5");
  const AttentionShape s{qd[0], qd[1], qd[2], qd[3], kd[0], kd[1], kd[4], softcap, window};
  if (kd[2] != s.k || kd[3] != s.h || vd[0] != s.nb || vd[1] != s.c || vd[2] != s.k ||
      vd[3] != s.l || vd[4] != s.h || positions.element_count() != s.b ||
      rows.element_count() != s.b || s.g > kMaxGroup)
    return ffi::Error::InvalidArgument("jinfer_decode_attention: inconsistent shapes");
  const float *qp = q.typed_data(), *kp = ck.typed_data(), *vp = cv.typed_data();
  const int32_t *pp = positions.typed_data(), *rp = rows.typed_data();
  float* op = out->typed_data();
  ParallelFor(pool, s.b * s.k, true, [&](int64_t t) {  // one task per (row, kv head)
    thread_local std::vector<float> scores;
    const int64_t r = t / s.k, kh = t % s.k;
    // kv head kh: keys at + kh * h * l, values at + kh * l * h within a row's block
    AttendOne(s, qp + t * s.g * s.h, kp + kh * s.h * s.l, vp + kh * s.l * s.h, pp[r], rp[r],
              op + t * s.g * s.h, scores);
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferDecodeAttention, DecodeAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("softcap")
                                  .Attr<int64_t>("window"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JinferBf16Matvec, Bf16Matvec,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
