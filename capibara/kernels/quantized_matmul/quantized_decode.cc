// y[M, N] (f32) = x[M, K] (f32) @ W for a QuantizedWeight W (int8 [K, N] or packed
// int4 [K/2, N], f32 scales/mins [K/group, N]): the few-row products of a decode step,
// as an XLA FFI handler for XLA:CPU.
//
// Why a native kernel: with a handful of rows the product is bound by reading the
// weights, and XLA rebuilds a float weight before its dot (writing and re-reading 4-8x
// the packed bytes). This kernel reads the packed bytes once and widens them in
// registers: per group, acc = Σ_k x[m, k] · q[k, n] (integers converted to f32, FMA),
// then y += scale · acc + (min - scale · offset) · Σ_k x[m, k] -- the dequantization
// costs two FMAs per group and column, not one per weight.
//
// Layout (capibara/kernels/quantized_matmul/weights.py): 4-bit byte j of a group holds
// row j (low nibble) and row j + group/2 (high nibble), N bytes a row. A task is a
// strip of 64 columns: one cache line of each byte row, widened into 4 vectors, with
// the partial sums of up to 4 rows of x in registers.
// Tasks are claimed from an atomic counter by the calling thread and XLA intra-op pool
// tasks (a task that starts late finds nothing left and returns).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#include "../native/f32x16.h"
#include "../native/task_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using capibara::simd::f32x16;
using capibara::simd::i32x16;
using capibara::simd::kLanes;

namespace {

typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef int8_t s8x16 __attribute__((vector_size(16)));
constexpr int kMaxRows = 4;     // rows of x per register block; more rows loop
constexpr int64_t kStrip = 64;  // columns per task
constexpr int64_t kAhead = 16;  // byte rows prefetched ahead

struct Problem {
  const float* x;
  const uint8_t* values;
  const float* scales;
  const float* mins;  // nullptr: none
  float* y;
  int64_t M, K, N, group, bits, offset;
  std::vector<float> xsum;  // [M, K / group]: Σ of x over each group
};

// 16 bytes (Full: a constant-size copy, one vector load) or `cols` of them, zeros past.
template <bool Full>
inline u8x16 load_bytes(const uint8_t* p, int64_t cols) {
  u8x16 v = {};
  std::memcpy(&v, p, Full ? sizeof v : size_t(cols));
  return v;
}
// 16 bytes widened to 16 int32 lanes (zero- or sign-extended). GCC lowers the vector
// extension's u8 -> i32 convert to 16 scalar inserts; AVX-512 has one instruction.
template <bool Full, bool Signed>
inline i32x16 widen(const uint8_t* p, int64_t cols) {
  const u8x16 b = load_bytes<Full>(p, cols);
#if defined(__AVX512F__)
  __m128i v;
  std::memcpy(&v, &b, sizeof v);
  return (i32x16)(Signed ? _mm512_cvtepi8_epi32(v) : _mm512_cvtepu8_epi32(v));
#else
  return Signed ? __builtin_convertvector((s8x16)b, i32x16) : __builtin_convertvector(b, i32x16);
#endif
}

template <bool Full>
inline f32x16 load_floats(const float* p, int64_t cols) {
  f32x16 v = {};
  std::memcpy(&v, p, Full ? sizeof v : size_t(cols) * 4);
  return v;
}

// Columns [n, n + V·16) (Full) or [n, n + cols) with V = 1, cols <= 16, for rows
// m0 .. m0 + R of x. V = 4: a whole cache line of each byte row per load sweep.
template <int R, int V, bool Full>
void columns(const Problem& p, int64_t m0, int64_t n, int64_t cols) {
  const int64_t G = p.K / p.group, half = p.group / 2;
  f32x16 y[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) y[r][v] = f32x16{};
  for (int64_t g = 0; g < G; ++g) {
    f32x16 acc[R][V];
    for (int r = 0; r < R; ++r)
      for (int v = 0; v < V; ++v) acc[r][v] = f32x16{};
    const float* xg = p.x + m0 * p.K + g * p.group;
    if (p.bits == 4) {
      const uint8_t* w = p.values + (g * half) * p.N + n;
      for (int64_t j = 0; j < half; ++j, w += p.N) {
        // The strip's lines are N bytes apart, a stride the hardware prefetcher does
        // not follow across pages: ask for the line kAhead rows down.
        __builtin_prefetch(w + kAhead * p.N);
        f32x16 lo[V], hi[V];
        for (int v = 0; v < V; ++v) {
          const i32x16 q = widen<Full, false>(w + 16 * v, cols);
          lo[v] = __builtin_convertvector(q & 15, f32x16);
          hi[v] = __builtin_convertvector(q >> 4, f32x16);
        }
        for (int r = 0; r < R; ++r) {
          const float a = xg[r * p.K + j], b = xg[r * p.K + j + half];
          for (int v = 0; v < V; ++v) acc[r][v] += a * lo[v] + b * hi[v];
        }
      }
    } else {
      const uint8_t* w = p.values + (g * p.group) * p.N + n;
      for (int64_t j = 0; j < p.group; ++j, w += p.N) {
        __builtin_prefetch(w + kAhead * p.N);
        f32x16 q[V];
        for (int v = 0; v < V; ++v) {
          q[v] = __builtin_convertvector((widen<Full, true>(w + 16 * v, cols)), f32x16);
        }
        for (int r = 0; r < R; ++r) {
          const float a = xg[r * p.K + j];
          for (int v = 0; v < V; ++v) acc[r][v] += a * q[v];
        }
      }
    }
    for (int v = 0; v < V; ++v) {
      const f32x16 s = load_floats<Full>(p.scales + g * p.N + n + 16 * v, cols);
      f32x16 shift = p.mins ? load_floats<Full>(p.mins + g * p.N + n + 16 * v, cols) : f32x16{};
      shift -= s * float(p.offset);  // w = s·q + (min - s·offset)
      for (int r = 0; r < R; ++r) y[r][v] += s * acc[r][v] + p.xsum[(m0 + r) * G + g] * shift;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      std::memcpy(p.y + (m0 + r) * p.N + n + 16 * v, &y[r][v],
                  Full ? sizeof y[r][v] : size_t(cols) * 4);
}

using ColumnsFn = void (*)(const Problem&, int64_t, int64_t, int64_t);

// Full strips: 4 vectors of columns and up to 4 rows (16 accumulators); the edge:
// one vector, up to 8 rows.
template <int V, bool Full>
ColumnsFn columns_for(int rows) {
  switch (rows) {
    case 1: return columns<1, V, Full>;
    case 2: return columns<2, V, Full>;
    case 3: return columns<3, V, Full>;
    default: return columns<4, V, Full>;
  }
}

struct Work {
  Problem p;
  int64_t num_tasks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    for (int64_t t; (t = next.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      const int64_t lo = t * kStrip, hi = std::min(p.N, lo + kStrip);
      for (int64_t m0 = 0; m0 < p.M; m0 += kMaxRows) {
        const int rows = int(std::min<int64_t>(kMaxRows, p.M - m0));
        if (hi - lo == kStrip) {
          columns_for<kStrip / kLanes, true>(rows)(p, m0, lo, kStrip);
          continue;
        }
        for (int64_t n = lo; n < hi; n += kLanes) {
          const int64_t cols = std::min<int64_t>(kLanes, hi - n);
          (cols == kLanes ? columns_for<1, true>(rows) : columns_for<1, false>(rows))(
              p, m0, n, cols);
        }
      }
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error QuantizedDecode(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::AnyBuffer values,
                           ffi::Buffer<ffi::F32> scales, ffi::Buffer<ffi::F32> mins,
                           ffi::ResultBuffer<ffi::F32> y, int64_t bits, int64_t group,
                           int64_t offset, bool has_mins) {
  const auto xd = x.dimensions(), vd = values.dimensions(), sd = scales.dimensions();
  if (xd.size() != 2 || vd.size() != 2 || sd.size() != 2)
    return ffi::Error::InvalidArgument("quantized_matmul: x, values, scales must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = vd[1];
  const bool ok = (bits == 4 || bits == 8) && group > 0 && K % group == 0 &&
                  (bits == 8 || group % 2 == 0) && vd[0] == (bits == 4 ? K / 2 : K) &&
                  sd[0] == K / group && sd[1] == N;
  if (!ok) return ffi::Error::InvalidArgument("quantized_matmul: inconsistent shapes");
  if (M == 0 || N == 0) return ffi::Error::Success();
  auto work = std::make_shared<Work>();
  Problem& p = work->p;
  p = Problem{x.typed_data(), static_cast<const uint8_t*>(values.untyped_data()),
              scales.typed_data(), has_mins ? mins.typed_data() : nullptr, y->typed_data(),
              M, K, N, group, bits, offset, {}};
  const int64_t G = K / group;
  p.xsum.assign(M * G, 0.0f);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < G; ++g) {
      float s = 0.0f;
      for (int64_t i = 0; i < group; ++i) s += p.x[m * K + g * group + i];
      p.xsum[m * G + g] = s;
    }
  work->num_tasks = (N + kStrip - 1) / kStrip;
  capibara::tasks::run_shared(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CapibaraQuantizedDecode, QuantizedDecode,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("bits")
                                  .Attr<int64_t>("group")
                                  .Attr<int64_t>("offset")
                                  .Attr<bool>("has_mins"));
