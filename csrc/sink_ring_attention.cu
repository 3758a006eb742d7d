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
// Needs sm_80 or newer. The kernels' bodies live in include/livetalk/sink_ring_kernel.cuh, which a
// host SIMT emulator also builds (csrc/tests/kernel_emu.cpp); this file adds the CUDA element types,
// the launches and the C ABI.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>
#include <string.h>

#include "livetalk/sink_ring.h"
#include "livetalk/sink_ring_kernel.cuh"

namespace livetalk {

template <>
struct Elt<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ uint16_t bits(__half x) { return __half_as_ushort(x); }
  static __device__ __forceinline__ float bits_to_float(uint16_t b) { return __half2float(__ushort_as_half(b)); }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __half2 h = __floats2half2_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));  // not a uint32_t* view of h: that would alias (see rope_store8)
    return u;
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
  static __device__ __forceinline__ float bits_to_float(uint16_t b) {
    return __bfloat162float(__ushort_as_bfloat16(b));
  }
  static __device__ __forceinline__ uint32_t pack(float lo, float hi) {
    const __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    uint32_t u;
    memcpy(&u, &h, sizeof(u));
    return u;
  }
  static __device__ __forceinline__ void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
};

namespace {

template <typename T, int D, bool kPipelined>
lt_status launch(const lt_sink_ring_args& a, cudaStream_t stream) {
  const size_t smem = kernel_smem_bytes<T, D, kPipelined>();
  if (smem > 48 * 1024 &&
      cudaFuncSetAttribute(sink_ring_kernel<T, D, kPipelined>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           static_cast<int>(smem)) != cudaSuccess) {
    return LT_ERR_CUDA;
  }
  const dim3 grid((a.block_len + kTileQueries - 1) / kTileQueries, a.batch * a.heads, a.splits);
  sink_ring_kernel<T, D, kPipelined><<<grid, kThreads, smem, stream>>>(a);
  if (a.splits > 1) combine_kernel<T, D><<<dim3(a.block_len, a.batch * a.heads), D, 0, stream>>>(a);
  return cudaGetLastError() == cudaSuccess ? LT_OK : LT_ERR_CUDA;
}

template <typename T, int D>
lt_status dispatch_variant(const lt_sink_ring_args& a, cudaStream_t stream) {
  return a.variant == LT_VARIANT_SIMPLE ? launch<T, D, false>(a, stream) : launch<T, D, true>(a, stream);
}

template <typename T>
lt_status dispatch_head_dim(const lt_sink_ring_args& a, cudaStream_t stream) {
  switch (a.head_dim) {
    case 32: return dispatch_variant<T, 32>(a, stream);
    case 64: return dispatch_variant<T, 64>(a, stream);
    case 128: return dispatch_variant<T, 128>(a, stream);
    default: return LT_ERR_HEAD_DIM;
  }
}

}  // namespace
}  // namespace livetalk

extern "C" {

int lt_sink_ring_splits(int batch, int block_len, int heads, int cache_len, int sm_count) {
  return livetalk::splits_for(batch, block_len, heads, cache_len, sm_count);
}

size_t lt_sink_ring_workspace_bytes(int batch, int block_len, int heads, int head_dim, int splits) {
  return livetalk::workspace_bytes(batch, block_len, heads, head_dim, splits);
}

lt_status lt_sink_ring_attention(const lt_sink_ring_args* a, cudaStream_t stream) {
  if (a == nullptr || !a->q || !a->k || !a->v || !a->k_cache || !a->v_cache || !a->cos || !a->sin || !a->seg ||
      !a->out || a->batch <= 0 || a->block_len <= 0 || a->heads <= 0 || a->cache_len < 0 || a->sink_cap < 0 ||
      a->sink_cap > a->cache_len || a->splits < 1 || a->splits > livetalk::kMaxSplits ||
      (a->variant != LT_VARIANT_PIPELINED && a->variant != LT_VARIANT_SIMPLE)) {
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
