// out[B, S, Hq, D] = attention of the last S tokens of each sequence onto its paged
// KV cache (k_pages, v_pages [Hkv, P, page_size, D]), as an XLA FFI handler for
// XLA:CPU. The masking rule is capibara/kernels/paged_attention/common.py's: query s of
// sequence b sits at position lengths[b] - S + s and sees keys t with
// 0 <= t <= position (and t > position - window with a sliding window).
//
// Why a native kernel: a decode step's attention is tiny (a few sequences, a few
// pages each), and XLA:CPU runs the "xla" path's loop over page blocks as dozens of
// small thunks per layer (~100 us a layer for 8 sequences of ~64 tokens), where the
// arithmetic takes a few microseconds. Here one call does a layer: each task is one
// (sequence, kv head, tile of queries); it reads only the pages its queries see, each
// k/v row once for the whole GQA group, with an online softmax over blocks of keys,
// all in f32 (bf16 inputs are widened exactly; the output is rounded to the input
// dtype, to nearest even). Portable C++: the compiler vectorizes the loops over D.
//
// Work is shared by the calling thread and tasks on XLA's intra-op pool through one
// atomic task counter: a pool task that starts late finds nothing left and returns,
// so the caller never waits for a task that has not started.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <vector>

#include "../native/f32x16.h"
#include "../native/task_pool.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace capibara::simd;

constexpr int64_t kQueryTile = 16;  // queries per task (bounds the f32 scratch)
constexpr int64_t kKeyBlock = 64;   // keys per online-softmax step
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

struct Problem {
  const void* q;
  const void* k;
  const void* v;
  void* out;
  const int32_t* lengths;
  const int32_t* table;
  int64_t B, S, Hq, Hkv, D, P, page_size, pages_per_seq;
  float scale, soft_cap;  // soft_cap 0: none
  int64_t window;         // 0: none
};

// Per-thread f32 working set of one task, reused across its tasks.
struct Scratch {
  std::vector<float> q, acc, m, l, scores;
};

// q_row . key over D (the first D / 16 * 16 in vectors, the rest one by one).
template <typename T>
inline float dot(const float* q_row, const T* key, int64_t D) {
  f32x16 acc = {};
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) acc += load16(q_row + d) * load16(key + d);
  float sum = sum16(acc);
  for (; d < D; ++d) sum += q_row[d] * scalar(key + d);
  return sum;
}

// acc += weight * value over D.
template <typename T>
inline void axpy(float weight, const T* value, float* acc, int64_t D) {
  int64_t d = 0;
  for (; d + kLanes <= D; d += kLanes) {
    const f32x16 sum = load16(acc + d) + weight * load16(value + d);
    std::memcpy(acc + d, &sum, sizeof sum);
  }
  for (; d < D; ++d) acc[d] += weight * scalar(value + d);
}

// Rows of queries whose accumulators stay in registers across a block's values.
template <int C>
constexpr int64_t kRowBlock = C <= 4 ? 4 : 2;

// Asks for the cache lines of one k or v row (D elements of T) ahead of use: a
// block's rows sit on a few scattered pages, cold after the layer's weights streamed
// through the caches, and fetching them one miss at a time dominated a decode call.
template <typename T>
inline void prefetch_row(const T* row, int64_t D) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t at = 0; at < D * int64_t(sizeof(T)); at += 64) __builtin_prefetch(bytes + at);
}

// Queries [s0, s1) of sequence b, every query head of kv head h. C = D / 16 when D is
// 1..8 vectors of 16 (each k/v row widened once into registers for every query row),
// 0 for any other D (row by row, with a scalar tail).
template <typename T, int C>
void attend(const Problem& p, int64_t b, int64_t h, int64_t s0, int64_t s1, Scratch& sc) {
  const int64_t G = p.Hq / p.Hkv, D = p.D, rows = (s1 - s0) * G;
  const int64_t length = std::clamp<int64_t>(p.lengths[b], 0, p.pages_per_seq * p.page_size);
  const int64_t first = length - p.S + s0, last = length - p.S + s1 - 1;  // positions
  // NOTE: keys outside [lo, hi) are never read: pages past the length (stale or NaN)
  // and table entries outside the range (garbage) do not reach the output.
  const int64_t hi = std::min(length, last + 1);
  const int64_t lo = p.window > 0 ? std::max<int64_t>(0, first - p.window + 1) : 0;
  // Row-blocked loops run over padded rows: their weights are 0, their output unused.
  constexpr int64_t RB = C > 0 ? kRowBlock<C> : 1;
  const int64_t padded = (rows + RB - 1) / RB * RB;

  sc.q.assign(padded * D, 0.0f);
  sc.acc.assign(padded * D, 0.0f);
  sc.m.assign(rows, kNegInf);
  sc.l.assign(rows, 0.0f);
  sc.scores.assign(padded * kKeyBlock, 0.0f);
  const T* q = static_cast<const T*>(p.q);
  for (int64_t s = s0; s < s1; ++s)
    for (int64_t g = 0; g < G; ++g) {
      const T* src = q + ((b * p.S + s) * p.Hq + h * G + g) * D;
      float* row = &sc.q[((s - s0) * G + g) * D];
      for (int64_t d = 0; d < D; ++d) row[d] = p.scale * scalar(src + d);
    }

  const T* k = static_cast<const T*>(p.k);
  const T* v = static_cast<const T*>(p.v);
  const T* keys[kKeyBlock];
  const T* values[kKeyBlock];
  for (int64_t t0 = lo; t0 < hi; t0 += kKeyBlock) {
    const int64_t n = std::min(kKeyBlock, hi - t0);
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = t0 + j;
      const int64_t page = std::clamp<int64_t>(
          p.table[b * p.pages_per_seq + t / p.page_size], 0, p.P - 1);
      const int64_t at = ((h * p.P + page) * p.page_size + t % p.page_size) * D;
      keys[j] = k + at;
      values[j] = v + at;
      prefetch_row(keys[j], D);
      prefetch_row(values[j], D);
    }
    // Scores of every row against the block's keys, each key row read once for the
    // whole GQA group; -inf where the query does not see the key.
    for (int64_t j = 0; j < n; ++j) {
      const int64_t t = t0 + j;
      f32x16 key[C > 0 ? C : 1];
      if constexpr (C > 0)
        for (int c = 0; c < C; ++c) key[c] = load16(keys[j] + c * kLanes);
      for (int64_t r = 0; r < rows; ++r) {
        const int64_t position = length - p.S + s0 + r / G;
        const bool seen = t <= position && (p.window == 0 || t > position - p.window);
        float s = kNegInf;
        if (seen) {
          if constexpr (C > 0) {
            f32x16 sum = load16(&sc.q[r * D]) * key[0];
            for (int c = 1; c < C; ++c) sum += load16(&sc.q[r * D + c * kLanes]) * key[c];
            s = sum16(sum);
          } else {
            s = dot(&sc.q[r * D], keys[j], D);
          }
          if (p.soft_cap > 0.0f) s = p.soft_cap * std::tanh(s / p.soft_cap);
        }
        sc.scores[r * kKeyBlock + j] = s;
      }
    }
    for (int64_t r = 0; r < rows; ++r) {
      float* scores = &sc.scores[r * kKeyBlock];
      float block_max = kNegInf;
      for (int64_t j = 0; j < n; ++j) block_max = std::max(block_max, scores[j]);
      if (block_max == kNegInf) {  // this row sees nothing in the block
        std::fill(scores, scores + n, 0.0f);
        continue;
      }
      // Online softmax: rescale what the earlier blocks added to the new maximum.
      const float m_new = std::max(sc.m[r], block_max);
      const float correction = std::exp(sc.m[r] - m_new);  // 0 for the first block
      float* acc = &sc.acc[r * D];
      for (int64_t d = 0; d < D; ++d) acc[d] *= correction;
      float l = sc.l[r] * correction;
      for (int64_t j = n; j < kKeyBlock; ++j) scores[j] = kNegInf;
      for (int64_t j = 0; j < kKeyBlock; j += kLanes) {  // scores -> weights, in place
        const f32x16 s = load16(scores + j);
        const f32x16 w = s == kNegInf ? f32x16{} : exp16(s - m_new);
        std::memcpy(scores + j, &w, sizeof w);
        l += sum16(w);
      }
      sc.m[r] = m_new;
      sc.l[r] = l;
    }
    // acc += weights @ values, each value row read once for the whole group.
    if constexpr (C > 0) {
      for (int64_t r0 = 0; r0 < padded; r0 += RB) {
        f32x16 acc[RB][C];
        for (int64_t i = 0; i < RB; ++i)
          for (int c = 0; c < C; ++c) acc[i][c] = load16(&sc.acc[(r0 + i) * D + c * kLanes]);
        for (int64_t j = 0; j < n; ++j) {
          f32x16 value[C];
          for (int c = 0; c < C; ++c) value[c] = load16(values[j] + c * kLanes);
          for (int64_t i = 0; i < RB; ++i) {
            const float weight = sc.scores[(r0 + i) * kKeyBlock + j];
            for (int c = 0; c < C; ++c) acc[i][c] += weight * value[c];
          }
        }
        for (int64_t i = 0; i < RB; ++i)
          std::memcpy(&sc.acc[(r0 + i) * D], acc[i], sizeof acc[i]);
      }
    } else {
      for (int64_t j = 0; j < n; ++j)
        for (int64_t r = 0; r < rows; ++r) {
          const float weight = sc.scores[r * kKeyBlock + j];
          if (weight != 0.0f) axpy(weight, values[j], &sc.acc[r * D], D);
        }
    }
  }

  T* out = static_cast<T*>(p.out);
  for (int64_t s = s0; s < s1; ++s)
    for (int64_t g = 0; g < G; ++g) {
      const int64_t r = (s - s0) * G + g;
      const float* acc = &sc.acc[r * D];
      // A query that saw no key returns zeros (l == 0, acc == 0).
      const float inverse = sc.l[r] > 0.0f ? 1.0f / sc.l[r] : 0.0f;
      T* dst = out + ((b * p.S + s) * p.Hq + h * G + g) * D;
      for (int64_t d = 0; d < D; ++d) store(acc[d] * inverse, dst + d);
    }
}

using AttendFn = void (*)(const Problem&, int64_t, int64_t, int64_t, int64_t, Scratch&);

template <typename T>
AttendFn attend_for(int64_t D) {
  switch (D % kLanes == 0 ? D / kLanes : 0) {
    case 1: return attend<T, 1>;
    case 2: return attend<T, 2>;
    case 3: return attend<T, 3>;
    case 4: return attend<T, 4>;
    case 5: return attend<T, 5>;
    case 6: return attend<T, 6>;
    case 7: return attend<T, 7>;
    case 8: return attend<T, 8>;
    default: return attend<T, 0>;
  }
}

// One call's tasks (sequence, kv head, query tile), claimed through `next`. Owned by
// a shared_ptr: a pool task that starts after every task is claimed still reads it.
struct Work {
  Problem p;
  bool bf16 = false;
  int64_t tiles = 0, num_tasks = 0;
  std::atomic<int64_t> next{0}, done{0};

  void run() {
    const AttendFn fn = bf16 ? attend_for<uint16_t>(p.D) : attend_for<float>(p.D);
    Scratch scratch;
    for (int64_t task; (task = next.fetch_add(1, std::memory_order_relaxed)) < num_tasks;) {
      const int64_t tile = task % tiles, h = task / tiles % p.Hkv, b = task / tiles / p.Hkv;
      const int64_t s0 = tile * kQueryTile, s1 = std::min(p.S, s0 + kQueryTile);
      fn(p, b, h, s0, s1, scratch);
      done.fetch_add(1, std::memory_order_release);
    }
  }
};

ffi::Error PagedAttention(ffi::ThreadPool pool, ffi::AnyBuffer q, ffi::AnyBuffer k_pages,
                          ffi::AnyBuffer v_pages, ffi::Buffer<ffi::S32> lengths,
                          ffi::Buffer<ffi::S32> page_table, ffi::Result<ffi::AnyBuffer> out,
                          float scale, float soft_cap, int64_t window) {
  const auto qd = q.dimensions(), kd = k_pages.dimensions(), td = page_table.dimensions();
  if (qd.size() != 4 || kd.size() != 4 || td.size() != 2)
    return ffi::Error::InvalidArgument(
        "paged_attention: q must be [B, S, Hq, D], the pools [Hkv, P, page_size, D] and "
        "the page table [B, pages_per_seq]");
  const ffi::DataType dtype = q.element_type();
  if (dtype != ffi::DataType::F32 && dtype != ffi::DataType::BF16)
    return ffi::Error::InvalidArgument("paged_attention: the native kernel takes f32 or bf16");
  // bf16 pools may come as their uint16 bits (capibara/kernels/bit_views.py: XLA:CPU copies a
  // whole pool to turn the bits it keeps back into a bf16 operand).
  const auto pool_ok = [dtype](ffi::DataType t) {
    return t == dtype || (dtype == ffi::DataType::BF16 && t == ffi::DataType::U16);
  };
  if (!pool_ok(k_pages.element_type()) || !pool_ok(v_pages.element_type()) ||
      out->element_type() != dtype)
    return ffi::Error::InvalidArgument("paged_attention: q, pools and output dtypes differ");
  auto work = std::make_shared<Work>();
  Problem& p = work->p;
  p = Problem{q.untyped_data(), k_pages.untyped_data(), v_pages.untyped_data(),
              out->untyped_data(), lengths.typed_data(), page_table.typed_data(),
              qd[0], qd[1], qd[2], kd[0], qd[3], kd[1], kd[2], td[1],
              scale, soft_cap, window};
  if (kd[3] != p.D || p.Hkv == 0 || p.Hq % p.Hkv != 0 || td[0] != p.B)
    return ffi::Error::InvalidArgument("paged_attention: inconsistent shapes");
  if (p.B * p.S * p.Hq * p.D == 0) return ffi::Error::Success();
  if (p.P == 0 || p.page_size == 0 || p.pages_per_seq == 0) {  // nothing can be seen
    std::memset(p.out, 0, out->size_bytes());
    return ffi::Error::Success();
  }
  work->bf16 = dtype == ffi::DataType::BF16;
  work->tiles = (p.S + kQueryTile - 1) / kQueryTile;
  work->num_tasks = p.B * p.Hkv * work->tiles;
  capibara::tasks::run_shared(pool, work);
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CapibaraPagedAttention, PagedAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<float>("scale")
                                  .Attr<float>("soft_cap")
                                  .Attr<int64_t>("window"));
