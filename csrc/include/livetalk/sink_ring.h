/* The sink + ring attention kernel behind a plain C ABI (no torch headers): the CMake library
 * (liblivetalk_sink_ring), its C++ test/benchmark harness, the torch op binding and the TensorRT
 * plugin all call it.
 *
 *   out = softmax(rope(q) . [K_cache[sinks] | K_cache[ring] | rope(k)]^T / sqrt(D)) . [V ...]
 *
 * Layouts are contiguous, token-major: q, k, v, out (B, Nb, H, D); k_cache, v_cache (B, Np, H, D)
 * with keys already rotated; cos, sin (Nb, D/2) fp32; seg (2,) int32 on the device = valid sink
 * tokens, valid ring tokens (each a prefix of its segment; the ring starts at row sink_cap).
 * Element types: fp16 or bf16 (all five tensors alike), fp32 accumulation. Head dims 32, 64, 128.
 */
#ifndef LIVETALK_SINK_RING_H_
#define LIVETALK_SINK_RING_H_

#include <stddef.h>
#include <stdint.h>

#if defined(LT_NO_CUDA_HEADERS) /* host builds of the kernel's source (csrc/tests/kernel_emu.cpp) */
typedef struct CUstream_st* cudaStream_t;
#else
#include <cuda_runtime_api.h>
#endif

#ifdef __cplusplus
extern "C" {
#endif

typedef enum { LT_FP16 = 0, LT_BF16 = 1 } lt_dtype;

/* How K/V tiles reach shared memory: double-buffered with cp.async, the next tile's copies in flight
 * while this one is used (the default, 0), or one buffer loaded and then used (the first version,
 * kept so a GPU run can time both). */
typedef enum { LT_VARIANT_PIPELINED = 0, LT_VARIANT_SIMPLE = 1 } lt_variant;

typedef enum {
  LT_OK = 0,
  LT_ERR_ARGS = 1,       /* a null pointer, a non-positive size, sink_cap outside the cache */
  LT_ERR_HEAD_DIM = 2,   /* head_dim not 32, 64 or 128 */
  LT_ERR_DTYPE = 3,      /* dtype not LT_FP16 / LT_BF16 */
  LT_ERR_WORKSPACE = 4,  /* splits > 1 without a workspace */
  LT_ERR_CUDA = 5        /* a CUDA launch error (cudaGetLastError) */
} lt_status;

typedef struct {
  const void* q;
  const void* k;
  const void* v;
  const void* k_cache;
  const void* v_cache;
  const float* cos;
  const float* sin;
  const int32_t* seg;
  void* out;
  float* workspace; /* lt_sink_ring_workspace_bytes(...) bytes; may be NULL when splits == 1 */
  int batch, block_len, heads, head_dim, cache_len, sink_cap;
  int splits; /* 1 .. 16, from lt_sink_ring_splits */
  lt_dtype dtype;
  lt_variant variant;
} lt_sink_ring_args;

/* Splits of the key sequence that give the GPU (sm_count SMs) about two waves of CTAs. */
int lt_sink_ring_splits(int batch, int block_len, int heads, int cache_len, int sm_count);

/* fp32 scratch for the split partials: (splits, B, H, Nb) x (D + 2) floats; 0 when splits == 1. */
size_t lt_sink_ring_workspace_bytes(int batch, int block_len, int heads, int head_dim, int splits);

/* Enqueue the attention on `stream`; no host synchronisation (CUDA-graph capturable). */
lt_status lt_sink_ring_attention(const lt_sink_ring_args* args, cudaStream_t stream);

const char* lt_sink_ring_status_string(lt_status status);

#ifdef __cplusplus
}
#endif

#endif /* LIVETALK_SINK_RING_H_ */
