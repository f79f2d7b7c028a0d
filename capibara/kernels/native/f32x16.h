// 16 f32 lanes as a GCC/Clang vector extension, bf16 <-> f32 conversions, a lane
// sum and a vectorized exp: the portable vector helpers of the native kernels
// (paged_attention.cc, rope_kv_write.cc).
#pragma once

#include <cstdint>
#include <cstring>

namespace capibara::simd {

// 16 f32 lanes as a GCC/Clang vector extension: portable source that compiles to
// AVX-512 (or two AVX2 / four NEON registers), with the bf16 widening done in
// registers. For paged_attention.cc's 8 decode sequences of 64 tokens (GQA 12/4, D 64,
// caches hot, one core) the first version, scalar loops, took ~60 us a call; with
// these vectors and its register-blocked loops, ~28 us.
typedef float f32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef uint16_t u16x16 __attribute__((vector_size(32)));
constexpr int64_t kLanes = 16;

inline float bf16_to_f32(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Round to nearest even, as XLA's f32 -> bf16 convert; NaN stays a (quiet) NaN.
inline uint16_t f32_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return uint16_t(u >> 16);
}

inline float scalar(const float* p) { return *p; }
inline float scalar(const uint16_t* p) { return bf16_to_f32(*p); }
inline void store(float x, float* p) { *p = x; }
inline void store(float x, uint16_t* p) { *p = f32_to_bf16(x); }

inline f32x16 load16(const float* p) {
  f32x16 v;
  std::memcpy(&v, p, sizeof v);
  return v;
}
inline f32x16 load16(const uint16_t* p) {
  u16x16 h;
  std::memcpy(&h, p, sizeof h);
  return (f32x16)(__builtin_convertvector(h, u32x16) << 16);
}

typedef float f32x8 __attribute__((vector_size(32)));
typedef float f32x4 __attribute__((vector_size(16)));

// Sum of the 16 lanes as a halving tree (a lane-by-lane loop compiled to 16 extracts).
inline float sum16(f32x16 v) {
  const f32x8 v8 = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                   __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const f32x4 v4 = __builtin_shufflevector(v8, v8, 0, 1, 2, 3) +
                   __builtin_shufflevector(v8, v8, 4, 5, 6, 7);
  return (v4[0] + v4[2]) + (v4[1] + v4[3]);
}

// exp of 16 lanes: 2^n * p(r) with x = n ln2 + r, |r| <= ln2/2, p the degree-6
// Taylor polynomial (relative error < 2e-7 there); x <= -87 gives ~1e-38, i.e. 0 next
// to the row's maximum weight 1. -inf lanes (masked keys) are set to 0 by the caller.
inline f32x16 exp16(f32x16 x) {
  const f32x16 lo = f32x16{} - 87.0f, hi = f32x16{} + 88.0f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f32x16 half = x < 0.0f ? f32x16{} - 0.5f : f32x16{} + 0.5f;
  const i32x16 n_int = __builtin_convertvector(x * 1.44269504f + half, i32x16);  // round
  const f32x16 n = __builtin_convertvector(n_int, f32x16);
  const f32x16 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // ln2 in two parts
  f32x16 p = f32x16{} + 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  return p * (f32x16)((n_int + 127) << 23);  // times 2^n, n in [-126, 127]
}

}  // namespace capibara::simd
