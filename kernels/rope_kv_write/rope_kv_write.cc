// RoPE on a serving step's q and k, and the step's k and v written into the paged KV
// pools in place, as one XLA FFI handler for XLA:CPU:
//
//   q_out[i, h]                      = rotate(q[i, h], cos[i], sin[i])   (q's dtype)
//                                      (q's leading dims flatten to the N tokens)
//   k_pages[h, page[i], offset[i]]   = rotate(k[i, h], cos[i], sin[i])   (k's dtype, then the pool's)
//   v_pages[h, page[i], offset[i]]   = v[i, h]                           (the pool's dtype)
//
// with rotate the half-split RoPE of kernels/rope_kv_write/reference.py, in f32.
// Slots out of range are skipped; the pools are aliased to the outputs (XLA keeps
// them in place under a donated jit argument).
//
// Why a native kernel: in a batch-8 bf16 decode step of the `small` model, XLA:CPU
// ran this as five small thunks a layer (the rotations as loop fusions with a
// concatenate, two scatters), ~0.35 ms of a ~6.4 ms step (measured by removing them
// from the compiled step), for ~10K elements a layer. This call (with one RoPE table
// per step) took 0.11 ms off the step in a paired A/B; the rest is the projections'
// casts around it and the call itself.
#include <cstdint>
#include <cstring>

#include "../native/f32x16.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using namespace capibara::simd;

// Elements of one dtype, read and written as f32 (bf16 rounded to nearest even).
struct Elements {
  void* data;
  bool bf16;  // else f32

  float get(int64_t i) const {
    return bf16 ? bf16_to_f32(static_cast<const uint16_t*>(data)[i])
                : static_cast<const float*>(data)[i];
  }
  void put(int64_t i, float x) const {
    if (bf16)
      static_cast<uint16_t*>(data)[i] = f32_to_bf16(x);
    else
      static_cast<float*>(data)[i] = x;
  }
  // x as this dtype holds it (the rounding a cast to it does), as f32.
  float round(float x) const { return bf16 ? bf16_to_f32(f32_to_bf16(x)) : x; }
};

// bf16 (or its uint16 bits) vs f32; anything else is refused before this is called.
bool is_bf16(ffi::DataType t) { return t == ffi::DataType::BF16 || t == ffi::DataType::U16; }
bool supported(ffi::DataType t) { return is_bf16(t) || t == ffi::DataType::F32; }

// One row of D elements of `in` at `row`, rotated by (cos, sin) [D/2] and rounded to
// `in`'s dtype (as the unfused layer rounds), stored into `out` at `at`:
// out[j] = x1 c - x2 s, out[j + D/2] = x2 c + x1 s.
void rotate_row(const Elements& in, int64_t row, const float* cos, const float* sin,
                int64_t half, const Elements& out, int64_t at) {
  for (int64_t j = 0; j < half; ++j) {
    const float x1 = in.get(row + j), x2 = in.get(row + j + half);
    out.put(at + j, in.round(x1 * cos[j] - x2 * sin[j]));
    out.put(at + j + half, in.round(x2 * cos[j] + x1 * sin[j]));
  }
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

  const float* c = cos.typed_data();
  const float* s = sin.typed_data();
  const int64_t half = D / 2;
  const Elements q_in{q.untyped_data(), is_bf16(q.element_type())};
  const Elements q_rotated{q_out->untyped_data(), is_bf16(q.element_type())};
  for (int64_t i = 0; i < N; ++i)
    for (int64_t h = 0; h < Hq; ++h) {
      const int64_t row = (i * Hq + h) * D;
      rotate_row(q_in, row, c + i * half, s + i * half, half, q_rotated, row);
    }

  // The outputs alias the pools; should XLA ever hand over separate buffers, carry
  // the pools over first.
  if (k_out->untyped_data() != k_pages.untyped_data())
    std::memcpy(k_out->untyped_data(), k_pages.untyped_data(), k_pages.size_bytes());
  if (v_out->untyped_data() != v_pages.untyped_data())
    std::memcpy(v_out->untyped_data(), v_pages.untyped_data(), v_pages.size_bytes());

  const Elements k_in{k.untyped_data(), is_bf16(k.element_type())};
  const Elements v_in{v.untyped_data(), is_bf16(v.element_type())};
  const Elements k_pool{k_out->untyped_data(), is_bf16(k_pages.element_type())};
  const Elements v_pool{v_out->untyped_data(), is_bf16(v_pages.element_type())};
  const int32_t* pages = write_pages.typed_data();
  const int32_t* offsets = write_offsets.typed_data();
  for (int64_t i = 0; i < N; ++i) {
    const int64_t page = pages[i], offset = offsets[i];
    if (page < 0 || page >= P || offset < 0 || offset >= page_size) continue;
    for (int64_t h = 0; h < Hkv; ++h) {
      const int64_t row = (i * Hkv + h) * D;
      const int64_t slot = ((h * P + page) * page_size + offset) * D;
      rotate_row(k_in, row, c + i * half, s + i * half, half, k_pool, slot);
      for (int64_t j = 0; j < D; ++j) v_pool.put(slot + j, v_in.get(row + j));
    }
  }
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
