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
// Work is split between the calling thread and tasks on XLA's intra-op thread pool
// (see Work and Region below): each starts on its own contiguous share and then
// takes what is left of the others', so the caller never waits for a task that has
// not started (no deadlock when the pool is busy: the caller then does it all).
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <numeric>
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
constexpr int64_t kPrefetchBytes = 16384;    // kn: along the rows
constexpr int64_t kChunkBytes = 32768;  // weight bytes per unit of work shared out
// nk: rows of x up to which each weight row streams alone (see nk_block).
constexpr int64_t kOneStreamMaxXBytes = 16384;

#if CAPIBARA_DPBF16
// ---- AVX512-BF16 --------------------------------------------------------------------

inline __m512bh as_bh(__m512i v) { return (__m512bh)v; }

// Rows of w [K, N] per pass of kn_rows when x has several rows. Rows N * 2 bytes
// apart share L1 sets (64 sets of 64 B: addresses 4 KiB apart collide); at most ~6
// lines per set leaves room in the 12 ways for the partial sums and x. 32 otherwise.
inline int64_t group_rows(int64_t N) {
  // Distinct 4 KiB offsets among the rows: 1 when N * 2 is a multiple of 4096.
  const int64_t distinct = 4096 / std::gcd<int64_t>(4096, (N * 2) % 4096);
  return std::min<int64_t>(32, std::max<int64_t>(2, 6 * distinct / 2 * 2));
}

// x rows as (x[m, k], x[m, k+1]) words, a zero after an odd K: one broadcast per pair.
std::vector<int32_t> pair_words(const uint16_t* x, int64_t M, int64_t K) {
  const int64_t kp = (K + 1) / 2;
  std::vector<int32_t> pairs(M * kp);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t i = 0; i < kp; ++i) {
      const uint32_t second = 2 * i + 1 < K ? x[m * K + 2 * i + 1] : 0;
      pairs[m * kp + i] = int32_t(x[m * K + 2 * i] | (second << 16));
    }
  return pairs;
}

// Adds rows [k_lo, k_hi) of w [K, N] (k_lo even) times x to acc [M, N]. Pairs of rows
// (k, k+1) are interleaved word by word so that each f32 lane holds (w[k, j],
// w[k+1, j]) for one column j, and x contributes the pair (x[m, k], x[m, k+1])
// broadcast to every lane (`xpairs` [M, (K + 1) / 2] from pair_words). Rows go in
// passes of `group`, the partial sums of 32 columns held in registers across a pass
// and in acc between passes, so the weights are read as `group` row streams rather
// than down a column strip.
template <int M>
void kn_rows(const int32_t* xpairs, const uint16_t* w, float* acc, int64_t K, int64_t N,
             int64_t k_lo, int64_t k_hi, int64_t group) {
  alignas(64) static const uint16_t kLo[32] = {0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37,
                                               6, 38, 7, 39, 8, 40, 9, 41, 10, 42, 11, 43,
                                               12, 44, 13, 45, 14, 46, 15, 47};
  alignas(64) static const uint16_t kHi[32] = {16, 48, 17, 49, 18, 50, 19, 51, 20, 52, 21,
                                               53, 22, 54, 23, 55, 24, 56, 25, 57, 26, 58,
                                               27, 59, 28, 60, 29, 61, 30, 62, 31, 63};
  const __m512i idx_lo = _mm512_load_si512(kLo), idx_hi = _mm512_load_si512(kHi);
  const int64_t kp = (K + 1) / 2;
  // Prefetch `ahead` rows down: at least the next group, at least kPrefetchBytes on.
  const int64_t ahead = std::max<int64_t>(group, (kPrefetchBytes / (2 * N) + 1) / 2 * 2);
  for (int64_t k0 = k_lo; k0 < k_hi; k0 += group) {
    const int64_t k1 = std::min(k_hi, k0 + group);
    for (int64_t j = 0; j < N; j += 32) {
      const int64_t cols = std::min<int64_t>(32, N - j);
      const __mmask32 wmask = cols == 32 ? ~__mmask32(0) : (__mmask32(1) << cols) - 1;
      const __mmask16 mlo = __mmask16(wmask), mhi = __mmask16(wmask >> 16);
      __m512 acc_lo[M], acc_hi[M];
      #pragma GCC unroll 8
      for (int m = 0; m < M; ++m) {
        acc_lo[m] = _mm512_maskz_loadu_ps(mlo, acc + m * N + j);
        acc_hi[m] = _mm512_maskz_loadu_ps(mhi, acc + m * N + j + 16);
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
        _mm512_mask_storeu_ps(acc + m * N + j, mlo, acc_lo[m]);
        _mm512_mask_storeu_ps(acc + m * N + j + 16, mhi, acc_hi[m]);
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

// R weight rows share each load of x. One row stream at a time (R = 1) while the
// product has at most one register block of rows and x stays small in L1
// (kOneStreamMaxXBytes); two rows per x load otherwise. On the 2-core Zen 5 VM, the
// small model's 85 decode products ([N, K] weights, one jit, variants compiled side
// by side and timed interleaved in one process): 8 rows 6.68 / 4.42 ms against
// 7.75 / 4.63 with two rows everywhere, 4 rows 3.84 against 5.00 (identical code
// varied by up to 9 % between such runs). With x past L1 (the down projection's
// K = 2048 at 8 rows: 32 KiB) one stream re-reading x ran 1.3-2x slower (timed in
// separate processes).
template <int M, int R>
void nk_block(const uint16_t* x, const uint16_t* w, float* y, int64_t K, int64_t N,
              int64_t lo, int64_t hi) {
  int64_t n = lo;
  for (; n + R <= hi; n += R) nk_rows<M, R>(x, w, y, K, N, n);
  for (; n < hi; ++n) nk_rows<M, 1>(x, w, y, K, N, n);
}

using KnFn = void (*)(const int32_t*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                     int64_t, int64_t);
using NkFn = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                     int64_t);

template <int... Ms>
KnFn kn_fn(int m, std::integer_sequence<int, Ms...>) {
  KnFn fn = nullptr;
  ((fn = m == Ms + 1 ? kn_rows<Ms + 1> : fn), ...);
  return fn;
}
template <int... Ms>
NkFn nk_fn(int m, bool share_x, std::integer_sequence<int, Ms...>) {
  NkFn fn = nullptr;
  ((fn = m == Ms + 1 ? (share_x && Ms + 1 > 2 ? nk_block<Ms + 1, 2> : nk_block<Ms + 1, 1>)
                     : fn),
   ...);
  return fn;
}

// Chunks [front, back) of one party's share, claimed by its owner from the front and
// by the others, once they run out of their own, from the back: each thread reads a
// contiguous stream while it can, and a late starter's share is not waited for.
class Region {
 public:
  void init(uint32_t front, uint32_t back) { bounds_.store(uint64_t(front) << 32 | back); }
  bool take_front(int64_t* chunk) { return take(chunk, true); }
  bool take_back(int64_t* chunk) { return take(chunk, false); }

 private:
  bool take(int64_t* chunk, bool front) {
    uint64_t v = bounds_.load(std::memory_order_relaxed);
    for (;;) {
      const uint32_t f = uint32_t(v >> 32), b = uint32_t(v);
      if (f >= b) return false;
      const uint64_t next = front ? uint64_t(f + 1) << 32 | b : uint64_t(f) << 32 | (b - 1);
      if (bounds_.compare_exchange_weak(v, next, std::memory_order_relaxed)) {
        *chunk = front ? f : b - 1;
        return true;
      }
    }
  }
  std::atomic<uint64_t> bounds_{0};
};

// One product shared by the calling thread (party 0) and XLA pool tasks (parties
// 1..). kn splits the rows of w (the contraction): party 0 adds into y, the others
// into their own partial sums, added to y at the end. nk splits the outputs.
// Owned by a shared_ptr: a pool task that starts after every chunk is taken finds
// nothing to do but still reads this state.
struct Work {
  const uint16_t* x;
  const uint16_t* w;
  float* y;
  int64_t M, K, N;
  bool transposed;
  std::vector<int32_t> xpairs;  // kn
  int64_t group = 0;            // kn rows per pass
  int64_t chunk = 0, extent = 0, num_chunks = 0;
  int parties = 1;
  std::unique_ptr<Region[]> regions;
  std::vector<std::vector<float>> partials;  // kn, parties 1..
  bool share_x = false;                       // nk: two weight rows per load of x
  std::atomic<int64_t> chunks_done{0};

  void setup(int max_parties) {
    extent = transposed ? N : K;
    if (transposed) {
      chunk = std::max<int64_t>(2, kChunkBytes / (2 * K));
      share_x = M > kMaxRows || M * K * 2 > kOneStreamMaxXBytes;
    } else {
      group = M == 1 ? 2 : group_rows(N);
      chunk = std::max<int64_t>(1, kChunkBytes / (2 * N) / group) * group;
      xpairs = pair_words(x, M, K);
    }
    num_chunks = (extent + chunk - 1) / chunk;
    parties = int(std::max<int64_t>(1, std::min<int64_t>(max_parties, num_chunks)));
    regions.reset(new Region[parties]);
    for (int p = 0; p < parties; ++p)
      regions[p].init(uint32_t(num_chunks * p / parties), uint32_t(num_chunks * (p + 1) / parties));
    partials.resize(parties - 1);
  }

  void run(int party) {
    int64_t c;
    while (regions[party].take_front(&c)) process(party, c);
    for (int i = 1; i < parties; ++i)
      while (regions[(party + i) % parties].take_back(&c)) process(party, c);
  }

  void process(int party, int64_t c) {
    const int64_t lo = c * chunk, hi = std::min(extent, lo + chunk);
    float* out = y;
    if (!transposed && party > 0) {
      std::vector<float>& mine = partials[party - 1];
      if (mine.empty()) mine.assign(M * N, 0.0f);
      out = mine.data();
    }
    const int64_t kp = (K + 1) / 2;
    for (int64_t m0 = 0; m0 < M; m0 += kMaxRows) {
      const int rows = int(std::min<int64_t>(kMaxRows, M - m0));
      const auto seq = std::make_integer_sequence<int, kMaxRows>{};
      if (transposed)
        nk_fn(rows, share_x, seq)(x + m0 * K, w, y + m0 * N, K, N, lo, hi);
      else
        kn_fn(rows, seq)(xpairs.data() + m0 * kp, w, out + m0 * N, K, N, lo, hi, group);
    }
    chunks_done.fetch_add(1, std::memory_order_release);
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
  work->setup(int(std::max<int64_t>(1, pool.num_threads())));
  if (!transposed) std::fill(work->y, work->y + M * N, 0.0f);
  for (int p = 1; p < work->parties; ++p)
    pool.Schedule([work, p] { work->run(p); });
  work->run(0);
  while (work->chunks_done.load(std::memory_order_acquire) < work->num_chunks) _mm_pause();
  for (const std::vector<float>& partial : work->partials)
    for (int64_t i = 0; i < int64_t(partial.size()); ++i) work->y[i] += partial[i];
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
