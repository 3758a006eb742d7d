// Fused attention of a block's queries over [identity sinks | ring | the block itself] (see
// include/livetalk/sink_ring.h for the contract and sink_ring_tile.h for the tile logic).
//
// One CTA = 64 queries of one (batch, head) and one split of the key sequence; 4 warps of 16
// query rows each. The CTA loads its Q tile once (rotated from the block's RoPE tables), then
// walks its split's 64-key tiles: each key row is fetched from the cache (keys stored rotated) or
// from the block (rotated on load), so no gather, copy or mask exists anywhere. Scores and P.V run
// on tensor cores (mma.sync m16n8k16, fp16/bf16 in, fp32 accumulate) with an online softmax in
// registers (FlashAttention-2's scheme); with several splits (small blocks) each split leaves
// (m, l, acc) in an fp32 workspace and a second kernel combines them (flash-decoding's scheme).
// Needs sm_80 or newer.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

#include "livetalk/sink_ring.h"
#include "livetalk/sink_ring_tile.h"

namespace livetalk {
namespace {

constexpr int kWarps = kTileQueries / 16;
constexpr int kThreads = kWarps * 32;
constexpr int kPad = 8;  // elements of padding per shared-memory row: 16-byte rows, fewer bank conflicts

template <typename T>
struct Elt;

template <>
struct Elt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <>
struct Elt<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

template <typename T>
__device__ __forceinline__ uint32_t ld_pair(const T* p) {  // two adjacent elements, 4-byte aligned
  return *reinterpret_cast<const uint32_t*>(p);
}

template <typename T>
__device__ __forceinline__ uint32_t pack_bits(T lo, T hi) {
  return static_cast<uint32_t>(Elt<T>::bits(lo)) | (static_cast<uint32_t>(Elt<T>::bits(hi)) << 16);
}

// Rotate one channel pair of a block token (queries and the block's own keys) into shared memory.
template <typename T>
__device__ __forceinline__ void rope_store(const T* src, const float* cos, const float* sin, int idx, T* dst) {
  float y0, y1;
  rope_pair(Elt<T>::to_float(src[0]), Elt<T>::to_float(src[1]), cos[idx], sin[idx], &y0, &y1);
  dst[0] = Elt<T>::from_float(y0);
  dst[1] = Elt<T>::from_float(y1);
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) sink_ring_kernel(lt_sink_ring_args p) {
  constexpr int S = D + kPad;  // shared-memory row stride (elements)
  constexpr int P = D / 2;     // RoPE pairs per token
  constexpr int NT = kTileKeys / 8;
  extern __shared__ __align__(16) unsigned char smem_raw[];
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
    __syncthreads();  // the previous tile is consumed (and, the first time, the Q tile is written)
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
    __syncthreads();

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
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 1));
      tmax[r] = fmaxf(tmax[r], __shfl_xor_sync(0xffffffffu, tmax[r], 2));
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
    st[r].l += __shfl_xor_sync(0xffffffffu, st[r].l, 1);
    st[r].l += __shfl_xor_sync(0xffffffffu, st[r].l, 2);
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
__global__ void __launch_bounds__(D) combine_kernel(lt_sink_ring_args p) {
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

template <typename T, int D>
lt_status launch(const lt_sink_ring_args& a, cudaStream_t stream) {
  const size_t smem = static_cast<size_t>(kTileQueries + 2 * kTileKeys) * (D + kPad) * sizeof(T);
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(sink_ring_kernel<T, D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    return LT_ERR_CUDA;
  }
  const dim3 grid((a.block_len + kTileQueries - 1) / kTileQueries, a.batch * a.heads, a.splits);
  sink_ring_kernel<T, D><<<grid, kThreads, smem, stream>>>(a);
  if (a.splits > 1) combine_kernel<T, D><<<dim3(a.block_len, a.batch * a.heads), D, 0, stream>>>(a);
  return cudaGetLastError() == cudaSuccess ? LT_OK : LT_ERR_CUDA;
}

template <typename T>
lt_status dispatch_head_dim(const lt_sink_ring_args& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 32: return launch<T, 32>(a, stream);
    case 64: return launch<T, 64>(a, stream);
    case 128: return launch<T, 128>(a, stream);
    default: return LT_ERR_HEAD_DIM;
  }
}

}  // namespace
}  // namespace livetalk

extern "C" {

int lt_sink_ring_splits(int batch, int block_len, int heads, int cache_len, int sm_count) {
  const int q_tiles = (block_len + livetalk::kTileQueries - 1) / livetalk::kTileQueries;
  return livetalk::choose_splits(q_tiles, batch * heads, cache_len + block_len, sm_count);
}

size_t lt_sink_ring_workspace_bytes(int batch, int block_len, int heads, int head_dim, int splits) {
  if (splits <= 1) return 0;
  return static_cast<size_t>(splits) * batch * heads * block_len * (head_dim + 2) * sizeof(float);
}

lt_status lt_sink_ring_attention(const lt_sink_ring_args* a, cudaStream_t stream) {
  if (a == nullptr || !a->q || !a->k || !a->v || !a->k_cache || !a->v_cache || !a->cos || !a->sin || !a->seg ||
      !a->out || a->batch <= 0 || a->block_len <= 0 || a->heads <= 0 || a->cache_len < 0 || a->sink_cap < 0 ||
      a->sink_cap > a->cache_len || a->splits < 1 || a->splits > livetalk::kMaxSplits) {
    return LT_ERR_ARGS;
  }
  if (a->splits > 1 && a->workspace == nullptr) return LT_ERR_WORKSPACE;
  switch (a->dtype) {
    case LT_FP16: return livetalk::dispatch_head_dim<__half>(*a, stream);
    case LT_BF16: return livetalk::dispatch_head_dim<__nv_bfloat16>(*a, stream);
    default: return LT_ERR_DTYPE;
  }
}

const char* lt_sink_ring_status_string(lt_status status) {
  switch (status) {
    case LT_OK: return "ok";
    case LT_ERR_ARGS: return "bad arguments (a null pointer, a non-positive size or sink_cap outside the cache)";
    case LT_ERR_HEAD_DIM: return "head_dim must be 32, 64 or 128";
    case LT_ERR_DTYPE: return "dtype must be fp16 or bf16";
    case LT_ERR_WORKSPACE: return "splits > 1 needs a workspace (lt_sink_ring_workspace_bytes)";
    case LT_ERR_CUDA: return "CUDA launch failed (cudaGetLastError)";
  }
  return "unknown status";
}

}  // extern "C"
