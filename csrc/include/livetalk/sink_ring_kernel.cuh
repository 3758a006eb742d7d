// The sink + ring attention kernels' bodies (see sink_ring_attention.cu for the design), written
// once for two compilers: nvcc builds them as CUDA kernels (sink_ring_attention.cu), and the host
// SIMT emulator of the test suite (csrc/tests/kernel_emu.cpp) builds the same source as C++, with
// one OS thread per CUDA thread, barriers for __syncthreads and the warp collectives, and mma.sync
// computed from the PTX ISA's fragment layouts.
//
// The includer provides `Elt<T>` for its element types (to_float, from_float, bits, pack, mma) and,
// outside nvcc, the LT_* primitives and `threadIdx` / `blockIdx`.
#pragma once

#include <stdint.h>

#include "livetalk/sink_ring.h"
#include "livetalk/sink_ring_tile.h"

#if defined(__CUDACC__)
#define LT_GLOBAL __global__
#define LT_DEVICE __device__ __forceinline__
#define LT_LAUNCH_BOUNDS(n) __launch_bounds__(n)
#define LT_DYNAMIC_SMEM(name) extern __shared__ __align__(16) unsigned char name[]
#define LT_SYNCTHREADS() __syncthreads()
#define LT_SHFL_XOR(v, mask) __shfl_xor_sync(0xffffffffu, v, mask)
#endif

namespace livetalk {

constexpr int kWarps = kTileQueries / 16;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;  // elements of padding per shared-memory row: 16-byte rows, fewer bank conflicts

template <typename T>
struct Elt;  // element type traits and the tensor-core op: provided by the includer

// Splits of the key sequence for a problem size on a GPU with `sm_count` SMs (lt_sink_ring_splits).
inline int splits_for(int batch, int block_len, int heads, int cache_len, int sm_count) {
  const int q_tiles = (block_len + kTileQueries - 1) / kTileQueries;
  return choose_splits(q_tiles, batch * heads, cache_len + block_len, sm_count);
}

// fp32 scratch of the split partials: acc (D) + m + l per (split, batch, head, query row).
inline size_t workspace_bytes(int batch, int block_len, int heads, int head_dim, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * batch * heads * block_len * (head_dim + 2) * sizeof(float);
}

// Dynamic shared memory of the main kernel for head dim D: the Q tile, one K tile, one V tile.
template <typename T, int D>
constexpr size_t kernel_smem_bytes() {
  return static_cast<size_t>(kTileQueries + 2 * kTileKeys) * (D + kPad) * sizeof(T);
}

template <typename T>
LT_DEVICE uint32_t ld_pair(const T* p) {  // two adjacent elements, 4-byte aligned
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
LT_DEVICE uint32_t pack_bits(T lo, T hi) {
  return static_cast<uint32_t>(Elt<T>::bits(lo)) | (static_cast<uint32_t>(Elt<T>::bits(hi)) << 16);
}

// Rotate one channel pair of a block token (queries and the block's own keys) into shared memory.
template <typename T>
LT_DEVICE void rope_store(const T* src, const float* cos, const float* sin, int idx, T* dst) {
  float y0, y1;
  rope_pair(Elt<T>::to_float(src[0]), Elt<T>::to_float(src[1]), cos[idx], sin[idx], &y0, &y1);
  dst[0] = Elt<T>::from_float(y0);
  dst[1] = Elt<T>::from_float(y1);
}

template <typename T, int D>
LT_GLOBAL void LT_LAUNCH_BOUNDS(kThreads) sink_ring_kernel(lt_sink_ring_args p) {
  constexpr int S = D + kPad;  // shared-memory row stride (elements)
  constexpr int P = D / 2;     // RoPE pairs per token
  constexpr int NT = kTileKeys / 8;
  LT_DYNAMIC_SMEM(smem_raw);
  T* qs = reinterpret_cast<T*>(smem_raw);
  T* ks = qs + kTileQueries * S;
  T* vs = ks + kTileKeys * S;

  const int bh = blockIdx.y, split = blockIdx.z;
  const int b = bh / p.heads, h = bh % p.heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t4 = lane & 3;
  const Segments seg = make_segments(p.seg[0], p.seg[1], p.sink_cap, p.cache_len, p.block_len);
  const KeyRange range = split_range(seg.total(), p.splits, split);
  const int q0 = blockIdx.x * kTileQueries;
  const size_t tok = static_cast<size_t>(p.heads) * D;  // elements from one token to the next
  const size_t blk0 = static_cast<size_t>(b) * p.block_len * tok + static_cast<size_t>(h) * D;
  const size_t cch0 = static_cast<size_t>(b) * p.cache_len * tok + static_cast<size_t>(h) * D;
  const T* q = static_cast<const T*>(p.q) + blk0;
  const T* kb = static_cast<const T*>(p.k) + blk0;
  const T* vb = static_cast<const T*>(p.v) + blk0;
  const T* kc = static_cast<const T*>(p.k_cache) + cch0;
  const T* vc = static_cast<const T*>(p.v_cache) + cch0;

  for (int i = tid; i < kTileQueries * P; i += kThreads) {  // the Q tile, rotated
    const int r = i / P, pr = i % P, qi = q0 + r;
    T* dst = qs + r * S + 2 * pr;
    if (qi < p.block_len) {
      rope_store(q + qi * tok + 2 * pr, p.cos, p.sin, qi * P + pr, dst);
    } else {
      dst[0] = dst[1] = Elt<T>::from_float(0.f);
    }
  }

  float o[D / 8][4];
#pragma unroll
  for (int dn = 0; dn < D / 8; ++dn) o[dn][0] = o[dn][1] = o[dn][2] = o[dn][3] = 0.f;
  RowState st[2] = {row_start(), row_start()};  // this thread's rows: g and g + 8 of the warp's 16
  const float scale = score_scale_log2(D);
  const T* qw = qs + warp * 16 * S;

  for (int k0 = range.lo; k0 < range.hi; k0 += kTileKeys) {
    LT_SYNCTHREADS();  // the previous tile is consumed (and, the first time, the Q tile is written)
    for (int i = tid; i < kTileKeys * P; i += kThreads) {
      const int r = i / P, pr = i % P, j = k0 + r;
      T* kd = ks + r * S + 2 * pr;
      T* vd = vs + r * S + 2 * pr;
      if (j < range.hi) {
        const KeyRow src = key_row(seg, j);
        if (src.source == kFromCache) {
          const T* kr = kc + src.row * tok + 2 * pr;
          const T* vr = vc + src.row * tok + 2 * pr;
          kd[0] = kr[0];
          kd[1] = kr[1];
          vd[0] = vr[0];
          vd[1] = vr[1];
        } else {
          rope_store(kb + src.row * tok + 2 * pr, p.cos, p.sin, src.row * P + pr, kd);
          const T* vr = vb + src.row * tok + 2 * pr;
          vd[0] = vr[0];
          vd[1] = vr[1];
        }
      } else {
        kd[0] = kd[1] = vd[0] = vd[1] = Elt<T>::from_float(0.f);
      }
    }
    LT_SYNCTHREADS();

    float s[NT][4];  // this warp's 16 x 64 scores; thread: rows g, g+8 x cols n*8 + 2*t4 + {0, 1}
#pragma unroll
    for (int n = 0; n < NT; ++n) s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.f;
#pragma unroll
    for (int kk = 0; kk < D; kk += 16) {
      const uint32_t a[4] = {ld_pair(qw + g * S + kk + 2 * t4), ld_pair(qw + (g + 8) * S + kk + 2 * t4),
                             ld_pair(qw + g * S + kk + 8 + 2 * t4), ld_pair(qw + (g + 8) * S + kk + 8 + 2 * t4)};
#pragma unroll
      for (int n = 0; n < NT; ++n) {
        const T* kr = ks + (n * 8 + g) * S + kk + 2 * t4;
        Elt<T>::mma(s[n], a, ld_pair(kr), ld_pair(kr + 8));
      }
    }

    float tmax[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = k0 + n * 8 + 2 * t4 + (e & 1);
        const float x = col < range.hi ? s[n][e] * scale : -INFINITY;
        s[n][e] = x;
        tmax[e >> 1] = fmaxf(tmax[e >> 1], x);
      }
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {  // the four threads of a quad hold one row between them
      tmax[r] = fmaxf(tmax[r], LT_SHFL_XOR(tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], LT_SHFL_XOR(tmax[r], 2));
    }
    const float alpha[2] = {row_rescale(&st[0], tmax[0]), row_rescale(&st[1], tmax[1])};
#pragma unroll
    for (int dn = 0; dn < D / 8; ++dn) {
      o[dn][0] *= alpha[0];
      o[dn][1] *= alpha[0];
      o[dn][2] *= alpha[1];
      o[dn][3] *= alpha[1];
    }
#pragma unroll
    for (int n = 0; n < NT; ++n) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const float pe = row_prob(st[e >> 1], s[n][e]);
        s[n][e] = pe;
        st[e >> 1].l += pe;  // this thread's share of the row sum (the quad is summed at the end)
      }
    }

#pragma unroll
    for (int kk = 0; kk < kTileKeys / 16; ++kk) {  // O += P V; P's C fragments are A fragments
      const uint32_t a[4] = {Elt<T>::pack(s[2 * kk][0], s[2 * kk][1]), Elt<T>::pack(s[2 * kk][2], s[2 * kk][3]),
                             Elt<T>::pack(s[2 * kk + 1][0], s[2 * kk + 1][1]),
                             Elt<T>::pack(s[2 * kk + 1][2], s[2 * kk + 1][3])};
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        const T* vr = vs + (kk * 16 + 2 * t4) * S + dn * 8 + g;
        Elt<T>::mma(o[dn], a, pack_bits(vr[0], vr[S]), pack_bits(vr[8 * S], vr[9 * S]));
      }
    }
  }

#pragma unroll
  for (int r = 0; r < 2; ++r) {
    st[r].l += LT_SHFL_XOR(st[r].l, 1);
    st[r].l += LT_SHFL_XOR(st[r].l, 2);
  }
  const int bhn = p.batch * p.heads;
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    const int row = q0 + warp * 16 + g + 8 * r;
    if (row >= p.block_len) continue;
    if (p.splits == 1) {
      const float inv = st[r].l > 0.f ? 1.f / st[r].l : 0.f;
      T* dst = static_cast<T*>(p.out) + blk0 + row * tok;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        *reinterpret_cast<uint32_t*>(dst + dn * 8 + 2 * t4) = Elt<T>::pack(o[dn][2 * r] * inv, o[dn][2 * r + 1] * inv);
      }
    } else {  // this split's partial: acc (unnormalised), m, l
      const size_t part = (static_cast<size_t>(split) * bhn + bh) * p.block_len + row;
      float* acc = p.workspace + part * D;
#pragma unroll
      for (int dn = 0; dn < D / 8; ++dn) {
        acc[dn * 8 + 2 * t4] = o[dn][2 * r];
        acc[dn * 8 + 2 * t4 + 1] = o[dn][2 * r + 1];
      }
      if (t4 == 0) {
        float* ml = p.workspace + static_cast<size_t>(p.splits) * bhn * p.block_len * D;
        ml[part] = st[r].m;
        ml[static_cast<size_t>(p.splits) * bhn * p.block_len + part] = st[r].l;
      }
    }
  }
}

// One CTA per (query row, batch * head), one thread per channel: out = sum_s w_s acc_s / sum_s w_s l_s.
template <typename T, int D>
LT_GLOBAL void LT_LAUNCH_BOUNDS(D) combine_kernel(lt_sink_ring_args p) {
  const int row = blockIdx.x, bh = blockIdx.y, d = threadIdx.x;
  const int bhn = p.batch * p.heads;
  const size_t rows = static_cast<size_t>(bhn) * p.block_len;
  const float* ml = p.workspace + static_cast<size_t>(p.splits) * rows * D;
  float m_max = -INFINITY;
  for (int s = 0; s < p.splits; ++s) m_max = fmaxf(m_max, ml[s * rows + static_cast<size_t>(bh) * p.block_len + row]);
  float num = 0.f, den = 0.f;
  for (int s = 0; s < p.splits; ++s) {
    const size_t part = s * rows + static_cast<size_t>(bh) * p.block_len + row;
    const float w = combine_weight(ml[part], m_max);
    den += w * ml[static_cast<size_t>(p.splits) * rows + part];
    num += w * p.workspace[part * D + d];
  }
  const int b = bh / p.heads, h = bh % p.heads;
  T* out = static_cast<T*>(p.out);
  out[((static_cast<size_t>(b) * p.block_len + row) * p.heads + h) * D + d] =
      Elt<T>::from_float(den > 0.f ? num / den : 0.f);
}

}  // namespace livetalk
