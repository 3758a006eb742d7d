// The sink + ring attention kernels' bodies (see sink_ring_attention.cu for the design), written
// once for two compilers: nvcc builds them as CUDA kernels (sink_ring_attention.cu), and the host
// SIMT emulator of the test suite (csrc/tests/kernel_emu.cpp) builds the same source as C++, with
// one OS thread per CUDA thread, barriers for __syncthreads and the warp collectives, and mma.sync
// computed from the PTX ISA's fragment layouts.
//
// The includer provides `Elt<T>` for its element types (to_float, from_float, bits, bits_to_float,
// pack, mma) and,
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
#define LT_CP_ASYNC16(dst, src)                                                                     \
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(                                 \
                   static_cast<unsigned>(__cvta_generic_to_shared(dst))),                             \
               "l"(src))
#define LT_CP_COMMIT() asm volatile("cp.async.commit_group;\n" ::)
#define LT_CP_WAIT(n) asm volatile("cp.async.wait_group %0;\n" ::"n"(n))
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

// Dynamic shared memory of the main kernel for head dim D: the Q tile and one K and one V tile per
// buffer (two buffers when pipelined).
template <typename T, int D, bool kPipelined>
constexpr size_t kernel_smem_bytes() {
  return static_cast<size_t>(kTileQueries + (kPipelined ? 4 : 2) * kTileKeys) * (D + kPad) * sizeof(T);
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

// 16 bytes (8 elements) from src to dst, both 16-byte aligned.
struct alignas(16) Vec16 {
  uint32_t w[4];
};
LT_DEVICE void copy16(void* dst, const void* src) { *static_cast<Vec16*>(dst) = *static_cast<const Vec16*>(src); }

// Rotate 8 elements (4 channel pairs) of a block token into shared memory; idx: the first pair's
// table entry.
// The 16 bytes stay 32-bit words throughout (element bits in and out through Elt<T>): reading them
// through a T* would alias the words, which the optimiser may assume cannot happen.
template <typename T>
LT_DEVICE void rope_store8(const T* src, const float* cos, const float* sin, int idx, T* dst) {
  Vec16 x, y;
  copy16(&x, src);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float y0, y1;
    rope_pair(Elt<T>::bits_to_float(static_cast<uint16_t>(x.w[i] & 0xffffu)),
              Elt<T>::bits_to_float(static_cast<uint16_t>(x.w[i] >> 16)), cos[idx + i], sin[idx + i], &y0, &y1);
    y.w[i] = Elt<T>::pack(y0, y1);
  }
  copy16(dst, &y);
}

// What one CTA reads: its (batch, head)'s rows of every tensor, the segments and its split's keys.
template <typename T>
struct PassView {
  const T *q, *kb, *vb, *kc, *vc;  // the block's q, k, v and the cache's k, v, at (batch, head)
  const float *cos, *sin;
  size_t tok;  // elements from one token to the next (heads * head_dim)
  Segments seg;
  KeyRange range;
};

// The simple variant's tile load: channel pairs, plain loads and stores, rows past the range zeroed.
template <typename T, int D>
LT_DEVICE void load_tile(const PassView<T>& pv, int k0, T* ks, T* vs, int tid) {
  constexpr int S = D + kPad, P = D / 2;
  for (int i = tid; i < kTileKeys * P; i += kThreads) {
    const int r = i / P, pr = i % P, j = k0 + r;
    T* kd = ks + r * S + 2 * pr;
    T* vd = vs + r * S + 2 * pr;
    if (j < pv.range.hi) {
      const KeyRow src = key_row(pv.seg, j);
      if (src.source == kFromCache) {
        const T* kr = pv.kc + src.row * pv.tok + 2 * pr;
        const T* vr = pv.vc + src.row * pv.tok + 2 * pr;
        kd[0] = kr[0];
        kd[1] = kr[1];
        vd[0] = vr[0];
        vd[1] = vr[1];
      } else {
        rope_store(pv.kb + src.row * pv.tok + 2 * pr, pv.cos, pv.sin, src.row * P + pr, kd);
        const T* vr = pv.vb + src.row * pv.tok + 2 * pr;
        vd[0] = vr[0];
        vd[1] = vr[1];
      }
    } else {
      kd[0] = kd[1] = vd[0] = vd[1] = Elt<T>::from_float(0.f);
    }
  }
}

// The pipelined variant's tile load, issued a tile ahead: 16-byte chunks; cached rows by cp.async
// (complete at the issuing thread's next LT_CP_WAIT that covers them), the block's rows rotated
// through registers, rows past the range zeroed.
template <typename T, int D>
LT_DEVICE void issue_tile(const PassView<T>& pv, int k0, T* ks, T* vs, int tid) {
  constexpr int S = D + kPad, P = D / 2, C = D / 8;
  for (int i = tid; i < kTileKeys * C; i += kThreads) {
    const int r = i / C, c = i % C, j = k0 + r;
    T* kd = ks + r * S + 8 * c;
    T* vd = vs + r * S + 8 * c;
    if (j < pv.range.hi) {
      const KeyRow src = key_row(pv.seg, j);
      if (src.source == kFromCache) {
        LT_CP_ASYNC16(kd, pv.kc + src.row * pv.tok + 8 * c);
        LT_CP_ASYNC16(vd, pv.vc + src.row * pv.tok + 8 * c);
      } else {
        rope_store8(pv.kb + src.row * pv.tok + 8 * c, pv.cos, pv.sin, src.row * P + 4 * c, kd);
        copy16(vd, pv.vb + src.row * pv.tok + 8 * c);
      }
    } else {
      const Vec16 zero = {{0u, 0u, 0u, 0u}};
      copy16(kd, &zero);
      copy16(vd, &zero);
    }
  }
}

// One warp's 16 query rows against one K/V tile in shared memory: S = Q K^T on tensor cores, the
// online softmax in registers, O += P V. hi: the split's end (keys at or past it score -inf).
template <typename T, int D>
LT_DEVICE void attend_tile(const T* qw, const T* ks, const T* vs, int k0, int hi, float scale, int lane,
                           float (&o)[D / 8][4], RowState (&st)[2]) {
  constexpr int S = D + kPad, NT = kTileKeys / 8;
  const int g = lane >> 2, t4 = lane & 3;
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
      const float x = col < hi ? s[n][e] * scale : -INFINITY;
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

// kPipelined: K/V tiles double-buffered, the next one's copies in flight while this one is used
// (LT_VARIANT_PIPELINED); else one buffer, loaded and then used (LT_VARIANT_SIMPLE).
template <typename T, int D, bool kPipelined>
LT_GLOBAL void LT_LAUNCH_BOUNDS(kThreads) sink_ring_kernel(lt_sink_ring_args p) {
  constexpr int S = D + kPad;  // shared-memory row stride (elements)
  constexpr int P = D / 2;     // RoPE pairs per token
  LT_DYNAMIC_SMEM(smem_raw);
  T* qs = reinterpret_cast<T*>(smem_raw);  // the Q tile, then per buffer a K tile and a V tile
  auto k_tile = [&](int buf) { return qs + (kTileQueries + 2 * buf * kTileKeys) * S; };
  auto v_tile = [&](int buf) { return qs + (kTileQueries + (2 * buf + 1) * kTileKeys) * S; };

  const int bh = blockIdx.y, split = blockIdx.z;
  const int b = bh / p.heads, h = bh % p.heads;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane >> 2, t4 = lane & 3;
  const int q0 = blockIdx.x * kTileQueries;
  const size_t tok = static_cast<size_t>(p.heads) * D;  // elements from one token to the next
  const size_t blk0 = static_cast<size_t>(b) * p.block_len * tok + static_cast<size_t>(h) * D;
  const size_t cch0 = static_cast<size_t>(b) * p.cache_len * tok + static_cast<size_t>(h) * D;
  PassView<T> pv;
  pv.q = static_cast<const T*>(p.q) + blk0;
  pv.kb = static_cast<const T*>(p.k) + blk0;
  pv.vb = static_cast<const T*>(p.v) + blk0;
  pv.kc = static_cast<const T*>(p.k_cache) + cch0;
  pv.vc = static_cast<const T*>(p.v_cache) + cch0;
  pv.cos = p.cos;
  pv.sin = p.sin;
  pv.tok = tok;
  pv.seg = make_segments(p.seg[0], p.seg[1], p.sink_cap, p.cache_len, p.block_len);
  pv.range = split_range(pv.seg.total(), p.splits, split);

  for (int i = tid; i < kTileQueries * P; i += kThreads) {  // the Q tile, rotated
    const int r = i / P, pr = i % P, qi = q0 + r;
    T* dst = qs + r * S + 2 * pr;
    if (qi < p.block_len) {
      rope_store(pv.q + qi * tok + 2 * pr, p.cos, p.sin, qi * P + pr, dst);
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
  const int tiles = (pv.range.hi - pv.range.lo + kTileKeys - 1) / kTileKeys;

  if constexpr (kPipelined) {
    if (tiles > 0) issue_tile<T, D>(pv, pv.range.lo, k_tile(0), v_tile(0), tid);
    LT_CP_COMMIT();
    for (int t = 0; t < tiles; ++t) {
      const int nb = (t + 1) & 1;  // buffer nb was last read in iteration t - 1, before its closing barrier
      if (t + 1 < tiles) issue_tile<T, D>(pv, pv.range.lo + (t + 1) * kTileKeys, k_tile(nb), v_tile(nb), tid);
      LT_CP_COMMIT();  // a group per iteration, empty or not: tile t's group is then the second newest
      LT_CP_WAIT(1);   // this thread's copies of tile t have landed ...
      LT_SYNCTHREADS();  // ... and everyone's (and the Q tile, the first time)
      attend_tile<T, D>(qw, k_tile(t & 1), v_tile(t & 1), pv.range.lo + t * kTileKeys, pv.range.hi, scale, lane, o,
                        st);
      LT_SYNCTHREADS();  // buffer t & 1 is free for tile t + 2
    }
  } else {
    for (int t = 0; t < tiles; ++t) {
      const int k0 = pv.range.lo + t * kTileKeys;
      LT_SYNCTHREADS();  // the previous tile is consumed (and, the first time, the Q tile is written)
      load_tile<T, D>(pv, k0, k_tile(0), v_tile(0), tid);
      LT_SYNCTHREADS();
      attend_tile<T, D>(qw, k_tile(0), v_tile(0), k0, pv.range.hi, scale, lane, o, st);
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
