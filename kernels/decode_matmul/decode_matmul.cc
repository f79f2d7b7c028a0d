// y[M, N] (f32) = x[M, K] (bf16) @ w (bf16; [K, N], or [N, K] when `transposed`):
// the few-row products of a decode step, as an XLA FFI handler for XLA:CPU.
//
// Why a native kernel: with a handful of rows the product is bound by reading the
// weights, and XLA:CPU's bf16 dot reads them at about half the speed of its f32 dot,
// so bf16 weights bought no speed. This kernel reads each weight once, with
// AVX512-BF16's `vdpbf16ps` (32 bf16 products, summed in pairs into 16 f32 lanes per
// instruction; the products are exact, the sums f32) and partial sums in registers.
// Built only where the compiler targets AVX512-BF16 (`-march=native` on such a CPU);
// elsewhere the handler reports itself unavailable and Python uses XLA's dot.
//
// Work is split in column (or, transposed, row) chunks between the calling thread
// and XLA's intra-op thread pool. Chunks are claimed from an atomic counter, so the
// caller never waits on a task that has not started: no deadlock when the pool is
// busy, the caller then does every chunk itself.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#if defined(__AVX512BF16__) && defined(__AVX512BW__)
#include <immintrin.h>
#define CAPIBARA_DPBF16 1
#else
#define CAPIBARA_DPBF16 0
#endif

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

constexpr int kMaxRows = 8;  // rows of x per register block; more rows loop
// Software prefetch distances (measured on a Zen 5 core: 8-16 KiB ahead doubled the
// bandwidth of the 8-row products over the hardware prefetcher alone).
constexpr int64_t kPrefetchElements = 4096;  // nk: along each row stream (8 KiB)
constexpr int64_t kPrefetchBytes = 16384;    // kn: along each chunk's rows

// Signature shared by the block kernels: rows [0, M) of x, output columns
// [lo, hi) of y (rows of w when transposed).
using BlockFn = void (*)(const uint16_t* x, const uint16_t* w, float* y, int64_t K,
                         int64_t N, int64_t lo, int64_t hi);

#if CAPIBARA_DPBF16
// ---- AVX512-BF16 --------------------------------------------------------------------

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// w [K, N]: pairs of rows (k, k+1) are interleaved word by word so that each f32
// lane holds (w[k, j], w[k+1, j]) for one column j, and x contributes the pair
// (x[m, k], x[m, k+1]) broadcast to every lane. Rows are visited in groups of
// kGroup with the partial sums kept in y between groups, so the weights are read
// as kGroup sequential streams (hardware prefetch friendly) rather than down a
// column strip.
// Rows per pass of kn_block. Rows N * 2 bytes apart share L1 sets (64 sets of 64 B:
// addresses 4 KiB apart collide); at most ~6 lines per set leaves room in the 12
// ways for the partial sums and x. 32 rows otherwise.
inline int64_t group_rows(int64_t N) {
  int64_t stride = (N * 2) % 4096, distinct = 1;
  if (stride != 0) {
    int64_t a = 4096, b = stride;
    while (b) std::swap(a %= b, b);
    distinct = 4096 / a;
  }
  return std::min<int64_t>(32, std::max<int64_t>(2, 6 * distinct / 2 * 2));
}

template <int M>
void kn_block(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
              int64_t lo, int64_t hi) {
  // One row of x: partial sums are cheap to reload, so pairs of rows (two streams)
  // read best. More rows: groups amortize reloading them over more products.
  const int64_t kGroup = M == 1 ? 2 : group_rows(N);
  // x as (x[m, k], x[m, k+1]) words, a zero after an odd K: one broadcast per pair.
  const int64_t kp = (K + 1) / 2;
  std::vector<int32_t> xpairs(M * kp);
  #pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
    for (int64_t i = 0; i < kp; ++i) {
      const uint32_t hi16 = 2 * i + 1 < K ? x[m * K + 2 * i + 1] : 0;
      xpairs[m * kp + i] = int32_t(x[m * K + 2 * i] | (hi16 << 16));
    }
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37,
                                               6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43,
                                               12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                               53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                               27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i idx_lo = _mm512_load_si512(kLo), idx_hi = _mm512_load_si512(kHi);
  #pragma GCC unroll 8
  for (int m = 0; m < M; ++m) std::fill(y + m * N + lo, y + m * N + hi, 0.0f);
  // Prefetch rows `ahead` rows down: at least the next group, at least
  // kPrefetchBytes further along this chunk's stream.
  const int64_t ahead =
      std::max<int64_t>(kGroup, (kPrefetchBytes / (2 * (hi - lo)) + 1) / 2 * 2);
  for (int64_t k0 = 0; k0 < K; k0 += kGroup) {
    const int64_t k1 = std::min(K, k0 + kGroup);
    for (int64_t j = lo; j < hi; j += 32) {
      const int64_t cols = std::min<int64_t>(32, hi - j);
      const __mmask32 wmask = cols == 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
      const __mmask16 mlo = __mmask16(wmask), mhi = __mmask16(wmask >> 16);
      __m512 acc_lo[M], acc_hi[M];
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        acc_lo[m] = _mm512_maskz_loadu_ps(mlo, y + m * N + j);
        acc_hi[m] = _mm512_maskz_loadu_ps(mhi, y + m * N + j + 16);
      }
      for (int64_t k = k0; k < k1; k += 2) {
        const bool pair = k + 1 < K;
        // The same columns `ahead` rows down, into L2. The hardware prefetcher alone
        // reached about half the bandwidth once there are several rows of x per
        // weight; into L1 the 4 KiB-aliased rows evict each other.
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + ahead) * N + j), _MM_HINT_T1);
        _mm_prefetch(reinterpret_cast<const char*>(w + (k + 1 + ahead) * N + j), _MM_HINT_T1);
        const __m512i a = _mm512_maskz_loadu_epi16(wmask, w + k * N + j);
        const __m512i b = pair ? _mm512_maskz_loadu_epi16(wmask, w + (k + 1) * N + j)
                               : _mm512_setzero_si512();
        const __m512bh wlo = as_bh(_mm512_permutex2var_epi16(a, idx_lo, b));
        const __m512bh whi = as_bh(_mm512_permutex2var_epi16(a, idx_hi, b));
        #pragma GCC unroll 8
        for (int m = 0; m < M; ++m) {
          const __m512bh xv = as_bh(_mm512_set1_epi32(xpairs[m * kp + k / 2]));
          acc_lo[m] = _mm512_dpbf16_ps(acc_lo[m], xv, wlo);
          acc_hi[m] = _mm512_dpbf16_ps(acc_hi[m], xv, whi);
        }
      }
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        _mm512_mask_storeu_ps(y + m * N + j, mlo, acc_lo[m]);
        _mm512_mask_storeu_ps(y + m * N + j + 16, mhi, acc_hi[m]);
      }
    }
  }
}

// w [N, K]: each output is a dot product of two contiguous rows; R weight rows share
// each load of x.
template <int M, int R>
inline void nk_rows(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
                    int64_t n) {
  __m512 acc[R][M];
  #pragma GCC unroll 8
  for (int r = 0; r < R; ++r)
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t left = K - k;
    const __mmask32 mask = left >= 32 ? ~__mmask32(0) : (__mmask32(1) << left) - 1;
    __m512bh wv[R];
    // 8 KiB ahead in each row stream (measured: 2.8x the bandwidth at 8 rows of x,
    // 1.7x at one, on a 49 MB vocab table).
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
      _mm_prefetch(reinterpret_cast<const char*>(w + (n + r) * K + k + kPrefetchElements),
                   _MM_HINT_T0);
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) wv[r] = as_bh(_mm512_maskz_loadu_epi16(mask, w + (n + r) * K + k));
    #pragma GCC unroll 8
    for (int m = 0; m < M; ++m) {
      const __m512bh xv = as_bh(_mm512_maskz_loadu_epi16(mask, x + m * K + k));
      #pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], xv, wv[r]);
    }
  }
  #pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
    #pragma GCC unroll 8
    for (int r = 0; r < R; ++r) y[m * N + n + r] = _mm512_reduce_add_ps(acc[r][m]);
}

template <int M>
void nk_block(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
              int64_t lo, int64_t hi) {
  // One row stream at a time while x is 1-2 rows (the prefetched stream then runs
  // at ~48 GB/s on one core, 4 streams at ~35); two rows share each load of x beyond.
  constexpr int R = M <= 2 ? 1 : 2;
  int64_t n = lo;
  for (; n + R <= hi; n += R) nk_rows<M, R>(x, w, y, K, N, n);
  for (; n < hi; ++n) nk_rows<M, 1>(x, w, y, K, N, n);
}

template <int... Ms>
constexpr BlockFn pick(bool transposed, int m, std::integer_sequence<int, Ms...>) {
  BlockFn fn = nullptr;
  ((fn = (m == Ms + 1) ? (transposed ? nk_block<Ms + 1> : kn_block<Ms + 1>) : fn), ...);
  return fn;
}

BlockFn block_fn(bool transposed, int rows) {
  return pick(transposed, rows, std::make_integer_sequence<int, kMaxRows>{});
}

// Shared by the caller and the pool tasks; a task that starts after all chunks are
// claimed finds none and returns, so the state must outlive the call (shared_ptr).
struct Work {
  const uint16_t* x;
  const uint16_t* w;
  float* y;
  int64_t M, K, N, chunk, num_chunks;
  bool transposed;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};

  void run() {
    for (int64_t c; (c = next.fetch_add(1, std::memory_order_relaxed)) < num_chunks;) {
      const int64_t lo = c * chunk, hi = std::min(N, lo + chunk);
      for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
        const int rows = int(std::min<int64_t>(kMaxRows, M - m0));
        block_fn(transposed, rows)(x + m0 * K, w, y + m0 * N, K, N, lo, hi);
      }
      done.fetch_add(1, std::memory_order_acq_rel);
    }
  }
};

#endif  // CAPIBARA_DPBF16

ffi::Error DecodeMatmul(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x, ffi::Buffer<ffi::BF16> w,
                        ffi::ResultBuffer<ffi::F32> y, bool transposed) {
  const auto xd = x.dimensions(), wd = w.dimensions();
  if (xd.size() != 2 || wd.size() != 2)
    return ffi::Error::InvalidArgument("decode_matmul: x and w must be 2-D");
  const int64_t M = xd[0], K = xd[1], N = transposed ? wd[0] : wd[1];
  if ((transposed ? wd[1] : wd[0]) != K)
    return ffi::Error::InvalidArgument("decode_matmul: contracting sizes differ");
#if !CAPIBARA_DPBF16
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "decode_matmul: built without AVX512-BF16 (use XLA's dot)");
#else
  if (M == 0 || N == 0) return ffi::Error::Success();
  if (K == 0) {
    std::fill(y->typed_data(), y->typed_data() + M * N, 0.0f);
    return ffi::Error::Success();
  }
  auto work = std::make_shared<Work>();
  work->x = static_cast<const uint16_t*>(x.untyped_data());
  work->w = static_cast<const uint16_t*>(w.untyped_data());
  work->y = y->typed_data();
  work->M = M;
  work->K = K;
  work->N = N;
  work->transposed = transposed;
  // One contiguous chunk per thread: long sequential weight streams. Column chunks
  // are whole 32-column vectors.
  const int64_t threads = std::max<int64_t>(1, pool.num_threads());
  int64_t chunk = (N + threads - 1) / threads;
  if (!transposed) chunk = (chunk + 31) / 32 * 32;
  work->chunk = chunk;
  work->num_chunks = (N + chunk - 1) / chunk;
  for (int64_t t = 1; t < work->num_chunks; ++t) pool.Schedule([work] { work->run(); });
  work->run();
  while (work->done.load(std::memory_order_acquire) < work->num_chunks) {
    _mm_pause();
  }
  return ffi::Error::Success();
#endif
}

}  // namespace

extern "C" int CapibaraDecodeMatmulUsesDpbf16() { return CAPIBARA_DPBF16; }

XLA_FFI_DEFINE_HANDLER_SYMBOL(CapibaraDecodeMatmul, DecodeMatmul,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("transposed"));
