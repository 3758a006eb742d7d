// C++ harness of the standalone library: the kernel against a naive fp32 CUDA reference (one
// thread per query row, two passes over the gathered keys), then its time per call.
//
//   sink_ring_check [B Nb H D Np SINK_CAP SINK_LEN RING_LEN bf16|fp16 ITERS pipelined|simple]
//   default: the 1.3B shape, full window: 1 3072 12 128 12288 9216 9216 3072 bf16 50 pipelined
// Prints max |err|, relative L2, us per call and TFLOP/s (4 * B * H * Nb * keys * D flops).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "livetalk/sink_ring.h"
#include "livetalk/sink_ring_tile.h"

#define CHECK(x)                                                                  \
  do {                                                                            \
    cudaError_t e_ = (x);                                                         \
    if (e_ != cudaSuccess) {                                                      \
      std::fprintf(stderr, "%s:%d %s\n", __FILE__, __LINE__, cudaGetErrorString(e_)); \
      std::exit(1);                                                               \
    }                                                                             \
  } while (0)

template <typename T>
__device__ float to_f(T x);
template <>
__device__ float to_f(__half x) { return __half2float(x); }
template <>
__device__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__global__ void fill(T* x, size_t n, unsigned seed, float amp) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) {
    unsigned h = static_cast<unsigned>(i) * 2654435761u ^ seed * 40503u;
    h ^= h >> 13; h *= 0x5bd1e995u; h ^= h >> 15;
    x[i] = static_cast<T>(amp * (static_cast<float>(h & 0xffffff) / 8388608.f - 1.f));
  }
}

__global__ void fill_angles(float* c, float* s, int nb, int p) {
  int i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= nb * p) return;
  float a = (i / p + 24) * powf(10000.f, -2.f * (i % p) / (2 * p));  // any angles: the kernel reads tables
  c[i] = cosf(a);
  s[i] = sinf(a);
}

// fp32 reference: one thread per (b, query row, head); keys gathered through the same segment rule.
template <typename T>
__global__ void reference(lt_sink_ring_args a, float* out) {
  int idx = blockIdx.x * blockDim.x + threadIdx.x;
  if (idx >= a.batch * a.block_len * a.heads) return;
  const int h = idx % a.heads, qi = (idx / a.heads) % a.block_len, b = idx / (a.heads * a.block_len);
  const int d = a.head_dim, p = d / 2;
  const size_t tok = static_cast<size_t>(a.heads) * d;
  const T* q = static_cast<const T*>(a.q) + (static_cast<size_t>(b) * a.block_len + qi) * tok + h * d;
  float qr[128], acc[128];
  for (int i = 0; i < p; ++i) {
    float c = a.cos[qi * p + i], s = a.sin[qi * p + i], x0 = to_f(q[2 * i]), x1 = to_f(q[2 * i + 1]);
    qr[2 * i] = static_cast<float>(static_cast<T>(x0 * c - x1 * s));  // rotated, rounded like the kernel's load
    qr[2 * i + 1] = static_cast<float>(static_cast<T>(x0 * s + x1 * c));
  }
  const int n_sink = a.seg[0], n_ring = a.seg[1], n = n_sink + n_ring + a.block_len;
  auto key = [&](int j, float* kr, const T** vr) {
    const T* base;
    if (j < n_sink + n_ring) {
      int row = j < n_sink ? j : a.sink_cap + j - n_sink;
      base = static_cast<const T*>(a.k_cache) + (static_cast<size_t>(b) * a.cache_len + row) * tok + h * d;
      *vr = static_cast<const T*>(a.v_cache) + (static_cast<size_t>(b) * a.cache_len + row) * tok + h * d;
      for (int e = 0; e < d; ++e) kr[e] = to_f(base[e]);
    } else {
      int row = j - n_sink - n_ring;
      base = static_cast<const T*>(a.k) + (static_cast<size_t>(b) * a.block_len + row) * tok + h * d;
      *vr = static_cast<const T*>(a.v) + (static_cast<size_t>(b) * a.block_len + row) * tok + h * d;
      for (int i = 0; i < p; ++i) {
        float c = a.cos[row * p + i], s = a.sin[row * p + i], x0 = to_f(base[2 * i]), x1 = to_f(base[2 * i + 1]);
        kr[2 * i] = static_cast<float>(static_cast<T>(x0 * c - x1 * s));
        kr[2 * i + 1] = static_cast<float>(static_cast<T>(x0 * s + x1 * c));
      }
    }
  };
  float kr[128];
  const T* vr;
  float m = -INFINITY;
  for (int j = 0; j < n; ++j) {
    key(j, kr, &vr);
    float dot = 0.f;
    for (int e = 0; e < d; ++e) dot += qr[e] * kr[e];
    m = fmaxf(m, dot / sqrtf(static_cast<float>(d)));
  }
  float l = 0.f;
  for (int e = 0; e < d; ++e) acc[e] = 0.f;
  for (int j = 0; j < n; ++j) {
    key(j, kr, &vr);
    float dot = 0.f;
    for (int e = 0; e < d; ++e) dot += qr[e] * kr[e];
    float w = expf(dot / sqrtf(static_cast<float>(d)) - m);
    l += w;
    for (int e = 0; e < d; ++e) acc[e] += w * to_f(vr[e]);
  }
  for (int e = 0; e < d; ++e) out[(static_cast<size_t>(b) * a.block_len + qi) * tok + h * d + e] = acc[e] / l;
}

template <typename T>
__global__ void to_float(const T* x, float* y, size_t n) {
  for (size_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n; i += gridDim.x * blockDim.x) y[i] = to_f(x[i]);
}

template <typename T>
int run(int argc, char** argv) {
  auto arg = [&](int i, int def) { return argc > i ? std::atoi(argv[i]) : def; };
  const int B = arg(1, 1), NB = arg(2, 3072), H = arg(3, 12), D = arg(4, 128), NP = arg(5, 12288);
  const int CAP = arg(6, 9216), SL = arg(7, 9216), RL = arg(8, 3072), ITERS = arg(10, 50);
  const size_t nblk = static_cast<size_t>(B) * NB * H * D, ncch = static_cast<size_t>(B) * NP * H * D;
  T *q, *k, *v, *kc, *vc, *out;
  float *cs, *sn, *ref, *got;
  int32_t* seg;
  CHECK(cudaMalloc(&q, nblk * sizeof(T))); CHECK(cudaMalloc(&k, nblk * sizeof(T)));
  CHECK(cudaMalloc(&v, nblk * sizeof(T))); CHECK(cudaMalloc(&out, nblk * sizeof(T)));
  CHECK(cudaMalloc(&kc, ncch * sizeof(T))); CHECK(cudaMalloc(&vc, ncch * sizeof(T)));
  CHECK(cudaMalloc(&cs, NB * D / 2 * sizeof(float))); CHECK(cudaMalloc(&sn, NB * D / 2 * sizeof(float)));
  CHECK(cudaMalloc(&ref, nblk * sizeof(float))); CHECK(cudaMalloc(&got, nblk * sizeof(float)));
  CHECK(cudaMalloc(&seg, 2 * sizeof(int32_t)));
  const int32_t seg_h[2] = {SL, RL};
  CHECK(cudaMemcpy(seg, seg_h, sizeof(seg_h), cudaMemcpyHostToDevice));
  fill<<<256, 256>>>(q, nblk, 1, 2.f); fill<<<256, 256>>>(k, nblk, 2, 2.f); fill<<<256, 256>>>(v, nblk, 3, 1.f);
  fill<<<256, 256>>>(kc, ncch, 4, 2.f); fill<<<256, 256>>>(vc, ncch, 5, 1.f);
  fill_angles<<<(NB * D / 2 + 255) / 256, 256>>>(cs, sn, NB, D / 2);
  int dev = 0, sms = 0;
  CHECK(cudaGetDevice(&dev));
  CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev));
  lt_sink_ring_args a{};
  a.q = q; a.k = k; a.v = v; a.k_cache = kc; a.v_cache = vc; a.cos = cs; a.sin = sn; a.seg = seg; a.out = out;
  a.batch = B; a.block_len = NB; a.heads = H; a.head_dim = D; a.cache_len = NP; a.sink_cap = CAP;
  a.splits = lt_sink_ring_splits(B, NB, H, NP, sms);
  a.dtype = sizeof(T) == 2 && std::strcmp(argc > 9 ? argv[9] : "bf16", "fp16") == 0 ? LT_FP16 : LT_BF16;
  a.variant = argc > 11 && std::strcmp(argv[11], "simple") == 0 ? LT_VARIANT_SIMPLE : LT_VARIANT_PIPELINED;
  float* ws = nullptr;
  size_t wsb = lt_sink_ring_workspace_bytes(B, NB, H, D, a.splits);
  if (wsb) CHECK(cudaMalloc(&ws, wsb));
  a.workspace = ws;
  lt_status rc = lt_sink_ring_attention(&a, 0);
  if (rc != LT_OK) { std::fprintf(stderr, "error: %s\n", lt_sink_ring_status_string(rc)); return 1; }
  reference<T><<<(B * NB * H + 127) / 128, 128>>>(a, ref);
  to_float<<<256, 256>>>(out, got, nblk);
  CHECK(cudaDeviceSynchronize());
  std::vector<float> hr(nblk), hg(nblk);
  CHECK(cudaMemcpy(hr.data(), ref, nblk * sizeof(float), cudaMemcpyDeviceToHost));
  CHECK(cudaMemcpy(hg.data(), got, nblk * sizeof(float), cudaMemcpyDeviceToHost));
  double max_err = 0, num = 0, den = 0;
  for (size_t i = 0; i < nblk; ++i) {
    double e = std::fabs(static_cast<double>(hg[i]) - hr[i]);
    max_err = e > max_err ? e : max_err;
    num += e * e; den += static_cast<double>(hr[i]) * hr[i];
  }
  cudaEvent_t t0, t1;
  CHECK(cudaEventCreate(&t0)); CHECK(cudaEventCreate(&t1));
  for (int i = 0; i < 5; ++i) lt_sink_ring_attention(&a, 0);
  CHECK(cudaEventRecord(t0));
  for (int i = 0; i < ITERS; ++i) lt_sink_ring_attention(&a, 0);
  CHECK(cudaEventRecord(t1));
  CHECK(cudaEventSynchronize(t1));
  float ms = 0;
  CHECK(cudaEventElapsedTime(&ms, t0, t1));
  const double us = 1000.0 * ms / ITERS, keys = SL + RL + NB;
  const double tflops = 4.0 * B * H * NB * keys * D / (us * 1e-6) / 1e12;
  std::printf("shape B=%d Nb=%d H=%d D=%d Np=%d seg=[%d,%d] splits=%d %s %s\n", B, NB, H, D, NP, SL, RL, a.splits,
              a.dtype == LT_FP16 ? "fp16" : "bf16", a.variant == LT_VARIANT_SIMPLE ? "simple" : "pipelined");
  std::printf("max_abs_err %.3e rel_l2 %.3e us_per_call %.1f tflops %.1f\n", max_err, std::sqrt(num / den), us, tflops);
  return 0;
}

int main(int argc, char** argv) {
  if (argc > 9 && std::strcmp(argv[9], "fp16") == 0) return run<__half>(argc, argv);
  return run<__nv_bfloat16>(argc, argv);
}
