// RoPE on a serving step's q and k, and the step's k and v written into the paged KV
// pools in place, as one XLA FFI handler for XLA:CPU:
//
//   q_out[i, h]                      = rotate(q[i, h], cos[i], sin[i])   (q's dtype)
//                                      (q's leading dims flatten to the N tokens)
//   k_pages[h, page[i], offset[i]]   = rotate(k[i, h], cos[i], sin[i])   (k's dtype, then the pool's)
//   v_pages[h, page[i], offset[i]]   = v[i, h]                           (the pool's dtype)
//
// with rotate the half-split RoPE of capibara/kernels/rope_kv_write/reference.py, in f32.
// Slots out of range are skipped; the pools are aliased to the outputs (XLA keeps
// them in place under a donated jit argument).
//
// Why a native kernel: in a batch-8 bf16 decode step of the `small` model, XLA:CPU
// ran this as five small thunks a layer (the rotations as loop fusions with a
// concatenate, two scatters), ~0.35 ms of a ~6.4 ms step (measured by removing them
// from the compiled step), for ~10K elements a layer. One call on one thread, 16
// lanes at a time: for the 12 layers of 8 decode tokens 0.05 ms against XLA's
// 0.08-0.15 (make bench K=rope_kv_write); from ~32 tokens on XLA's multi-threaded
// path is faster, so implementation=None stops at 16 (capibara/kernels/rope_kv_write).
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "../native/f32x16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace capibara::simd;

// bf16 (or its uint16 bits) vs f32; anything else is refused before this is called.
bool is_bf16(ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; }
bool supported(ffi::DataType t) { return is_bf16(t) || t == ffi::DataType::F32; }

// 16 lanes rounded to nearest even bf16 (NaN kept a quiet NaN, as f32_to_bf16), as f32.
inline f32x16 round_bf16(f32x16 v) {
  const u32x16 u = (u32x16)v;
  const u32x16 rounded = (u + 0x7fffu + ((u >> 16) & 1u)) & 0xffff0000u;
  const u32x16 nan = (u | 0x00400000u) & 0xffff0000u;
  return (f32x16)((u & 0x7fffffffu) > 0x7f800000u ? nan : rounded);
}
// x as a T holds it (the rounding a cast to T does), kept as f32.
inline f32x16 round_as(f32x16 v, const float*) { return v; }
inline f32x16 round_as(f32x16 v, const uint16_t*) { return round_bf16(v); }
inline float round_as(float x, const float*) { return x; }
inline float round_as(float x, const uint16_t*) { return bf16_to_f32(f32_to_bf16(x)); }
inline void store16(f32x16 v, float* p) { std::memcpy(p, &v, sizeof v); }
inline void store16(f32x16 v, uint16_t* p) {
  const u16x16 h = __builtin_convertvector((u32x16)round_bf16(v) >> 16, u16x16);
  std::memcpy(p, &h, sizeof h);
}

// One row of D elements at `in`, rotated by (cos, sin) [D/2] and rounded to In (as the
// unfused layer rounds), stored at `out`: out[j] = x1 c - x2 s, out[j + D/2] =
// x2 c + x1 s. 16 lanes at a time, the rest one by one.
template <typename In, typename Out>
void rotate_row(const In* in, const float* cos, const float* sin, int64_t half, Out* out) {
  int64_t j = 0;
  for (; j + kLanes <= half; j += kLanes) {
    const f32x16 x1 = load16(in + j), x2 = load16(in + j + half);
    const f32x16 c = load16(cos + j), s = load16(sin + j);
    store16(round_as(x1 * c - x2 * s, in), out + j);
    store16(round_as(x2 * c + x1 * s, in), out + j + half);
  }
  for (; j < half; ++j) {
    const float x1 = scalar(in + j), x2 = scalar(in + j + half);
    store(round_as(x1 * cos[j] - x2 * sin[j], in), out + j);
    store(round_as(x2 * cos[j] + x1 * sin[j], in), out + j + half);
  }
}

// `n` elements converted from In to Out.
template <typename In, typename Out>
void convert_row(const In* in, int64_t n, Out* out) {
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) store16(load16(in + j), out + j);
  for (; j < n; ++j) store(scalar(in + j), out + j);
}

// The op for one combination of dtypes (q's, k's, v's and the two pools').
template <typename Q, typename K, typename V, typename KPool, typename VPool>
void rope_kv_write(const Q* q, const K* k, const V* v, const float* cos, const float* sin,
                   const int32_t* pages, const int32_t* offsets, Q* q_out, KPool* k_pool,
                   VPool* v_pool, int64_t N, int64_t Hq, int64_t Hkv, int64_t D, int64_t P,
                   int64_t page_size) {
  const int64_t half = D / 2;
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t row = (i * Hq + h) * D;
      rotate_row(q + row, cos + i * half, sin + i * half, half, q_out + row);
    }
  for (int64_t i = 0; i < N; ++i) {
    const int64_t page = pages[i], offset = offsets[i];
    if (page < 0 || page >= P || offset < 0 || offset >= page_size) continue;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t row = (i * Hkv + h) * D;
      const int64_t slot = ((h * P + page) * page_size + offset) * D;
      rotate_row(k + row, cos + i * half, sin + i * half, half, k_pool + slot);
      convert_row(v + row, D, v_pool + slot);
    }
  }
}

// Calls `f` with a null pointer of the element type of `t` (f32 or bf16 bits).
template <typename F>
void with_type(ffi::DataType t, F f) {
  if (is_bf16(t))
    f(static_cast<uint16_t*>(nullptr));
  else
    f(static_cast<float*>(nullptr));
}

ffi::Error RopeKvWrite(ffi::AnyBuffer q, ffi::AnyBuffer k, ffi::AnyBuffer v,
                       ffi::Buffer<ffi::F32> cos, ffi::Buffer<ffi::F32> sin,
                       ffi::AnyBuffer k_pages, ffi::AnyBuffer v_pages,
                       ffi::Buffer<ffi::S32> write_pages, ffi::Buffer<ffi::S32> write_offsets,
                       ffi::Result<ffi::AnyBuffer> q_out, ffi::Result<ffi::AnyBuffer> k_out,
                       ffi::Result<ffi::AnyBuffer> v_out) {
  const auto qd = q.dimensions(), kd = k.dimensions(), pd = k_pages.dimensions();
  if (qd.size() < 2 || kd.size() != 3 || pd.size() != 4)
    return ffi::Error::InvalidArgument(
        "rope_kv_write: q must be [..., H, D], k and v [N, H, D], the pools "
        "[Hkv, P, page_size, D]");
  const int64_t N = kd[0], Hq = qd[qd.size() - 2], D = qd[qd.size() - 1], Hkv = kd[1];
  const int64_t P = pd[1], page_size = pd[2];
  if (D % 2 != 0) return ffi::Error::InvalidArgument("rope_kv_write: D must be even");
  for (ffi::DataType t : {q.element_type(), k.element_type(), v.element_type(),
                          k_pages.element_type(), v_pages.element_type()})
    if (!supported(t))
      return ffi::Error::InvalidArgument("rope_kv_write: f32 or bf16 (uint16 bits) only");

  // The outputs alias the pools; should XLA ever hand over separate buffers, carry
  // the pools over first.
  if (k_out->untyped_data() != k_pages.untyped_data())
    std::memcpy(k_out->untyped_data(), k_pages.untyped_data(), k_pages.size_bytes());
  if (v_out->untyped_data() != v_pages.untyped_data())
    std::memcpy(v_out->untyped_data(), v_pages.untyped_data(), v_pages.size_bytes());

  with_type(q.element_type(), [&](auto* q_type) {
    with_type(k.element_type(), [&](auto* k_type) {
      with_type(v.element_type(), [&](auto* v_type) {
        with_type(k_pages.element_type(), [&](auto* k_pool_type) {
          with_type(v_pages.element_type(), [&](auto* v_pool_type) {
            using Q = std::remove_pointer_t<decltype(q_type)>;
            using K = std::remove_pointer_t<decltype(k_type)>;
            using V = std::remove_pointer_t<decltype(v_type)>;
            using KPool = std::remove_pointer_t<decltype(k_pool_type)>;
            using VPool = std::remove_pointer_t<decltype(v_pool_type)>;
            rope_kv_write(static_cast<const Q*>(q.untyped_data()),
                          static_cast<const K*>(k.untyped_data()),
                          static_cast<const V*>(v.untyped_data()), cos.typed_data(),
                          sin.typed_data(), write_pages.typed_data(),
                          write_offsets.typed_data(), static_cast<Q*>(q_out->untyped_data()),
                          static_cast<KPool*>(k_out->untyped_data()),
                          static_cast<VPool*>(v_out->untyped_data()), N, Hq, Hkv, D, P,
                          page_size);
          });
        });
      });
    });
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(CapibaraRopeKvWrite, RopeKvWrite,
                              ffi::Ffi::Bind()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Arg<ffi::Buffer<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Ret<ffi::AnyBuffer>());
