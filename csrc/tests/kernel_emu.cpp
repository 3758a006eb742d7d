// Host SIMT emulation of the CUDA kernels (csrc/include/livetalk/sink_ring_kernel.cuh), run by
// tests/test_csrc.py: the kernels' own source, built as C++ for the CPU.
//
//   kernel_emu IN OUT DTYPE SM_COUNT VARIANT
//                                       IN: tile_host's input format (int32 header [B, Nb, H, D, Np,
//                                       sink_cap, sink_len, ring_len, splits(ignored)] + fp32 tensors);
//                                       DTYPE bf16 | fp16; SM_COUNT sets the split count as on a GPU
//                                       with that many SMs; VARIANT pipelined | simple. OUT: fp32
//                                       (B, Nb, H, D), then one int32: the splits used.
//
// Every CUDA thread of a block is an OS thread: __syncthreads is a barrier of the block's threads,
// __shfl_xor_sync and mma.sync are warp collectives (each lane posts its registers, a barrier of the
// warp's 32 threads, each lane reads what it needs, a second barrier). mma.sync m16n8k16 is computed
// from the fragment layouts as the PTX ISA states them for .f16/.bf16 inputs and .f32 accumulators,
// written out here independently of the kernel (lane = 4 * groupID + threadID_in_group; a register
// holds two elements, the lower-indexed one in its low 16 bits):
//   A (16x16, row-major) a0..a7: row groupID for a0,a1,a4,a5 and groupID+8 for a2,a3,a6,a7;
//                                 col 2*threadID_in_group + (i & 1), plus 8 for a4..a7
//   B (16x8, column-major) b0..b3: row (k) 2*threadID_in_group + (i & 1), plus 8 for b2,b3; col groupID
//   C/D (16x8) c0..c3: row groupID for c0,c1 and groupID+8 for c2,c3; col 2*threadID_in_group + (i & 1)
// cp.async copies land only at the wait_group that covers them (see Copy below).
// What this cannot show: timing, memory-ordering hazards the barriers hide, and the hardware itself.
#define LT_NO_CUDA_HEADERS
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <deque>
#include <memory>
#include <thread>
#include <vector>

struct Dim3 {
  unsigned x = 0, y = 0, z = 0;
};
thread_local Dim3 threadIdx, blockIdx;

namespace emu {

struct Block {
  explicit Block(int threads, size_t smem_bytes)
      : sync(threads), smem(smem_bytes + 16), words(static_cast<size_t>(threads) * 6), floats(threads) {
    for (int w = 0; w < (threads + 31) / 32; ++w) warp.push_back(std::make_unique<std::barrier<>>(32));
  }
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warp;
  std::vector<unsigned char> smem;
  std::vector<uint32_t> words;  // mma operands posted by each thread (a0..a3, b0, b1)
  std::vector<float> floats;    // shuffle values posted by each thread
};

thread_local Block* block = nullptr;
thread_local int tid = 0;

inline void syncthreads() { block->sync.arrive_and_wait(); }
inline std::barrier<>& warp_sync() { return *block->warp[tid / 32]; }

inline float shfl_xor(float v, int mask) {
  block->floats[tid] = v;
  warp_sync().arrive_and_wait();
  const float r = block->floats[(tid & ~31) | ((tid & 31) ^ mask)];
  warp_sync().arrive_and_wait();
  return r;
}

// d = a . b + c for one lane of a warp-wide m16n8k16 (to_float: an element's 16 bits -> float).
template <float (*to_float)(uint16_t)>
void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  uint32_t* post = &block->words[static_cast<size_t>(tid) * 6];
  std::memcpy(post, a, sizeof(a));
  post[4] = b0;
  post[5] = b1;
  warp_sync().arrive_and_wait();
  const uint32_t* lanes = &block->words[static_cast<size_t>(tid & ~31) * 6];
  auto elem = [&](int lane, int reg, int half) {
    return to_float(static_cast<uint16_t>(lanes[lane * 6 + reg] >> (16 * half)));
  };
  auto A = [&](int row, int k) {  // a_i with i = (k & 1) + 2 * (row >= 8) + 4 * (k >= 8)
    const int i = (k & 1) + 2 * (row >= 8) + 4 * (k >= 8);
    return elem(4 * (row % 8) + (k % 8) / 2, i / 2, i % 2);
  };
  auto B = [&](int k, int col) {  // b_i with i = (k & 1) + 2 * (k >= 8)
    const int i = (k & 1) + 2 * (k >= 8);
    return elem(4 * col + (k % 8) / 2, 4 + i / 2, i % 2);
  };
  const int g = (tid & 31) >> 2, t = tid & 3;
  for (int i = 0; i < 4; ++i) {
    const int row = g + 8 * (i >> 1), col = 2 * t + (i & 1);
    float acc = 0.f;
    for (int k = 0; k < 16; ++k) acc += A(row, k) * B(k, col);
    c[i] += acc;
  }
  warp_sync().arrive_and_wait();
}

// cp.async: a thread's 16-byte copies are recorded (their source read at once: the kernel's global
// inputs never change) and land in shared memory only when a wait_group of that thread covers
// their group, so a tile used before its wait, or a wait on the wrong group, reads stale data.
struct Copy {
  void* dst;
  unsigned char bytes[16];
};
thread_local std::vector<Copy> open_group;
thread_local std::deque<std::vector<Copy>> groups;

inline void cp_async16(void* dst, const void* src) {
  Copy c{dst, {}};
  std::memcpy(c.bytes, src, 16);
  open_group.push_back(c);
}
inline void cp_commit() {
  groups.push_back(std::move(open_group));
  open_group.clear();
}
inline void cp_wait(size_t newest_pending) {
  while (groups.size() > newest_pending) {
    for (const Copy& c : groups.front()) std::memcpy(c.dst, c.bytes, 16);
    groups.pop_front();
  }
}

template <class Kernel>
void launch(Dim3 grid, int threads, size_t smem, Kernel kernel) {
  for (unsigned z = 0; z < grid.z; ++z) {
    for (unsigned y = 0; y < grid.y; ++y) {
      for (unsigned x = 0; x < grid.x; ++x) {
        Block b(threads, smem);
        std::vector<std::thread> pool;
        for (int t = 0; t < threads; ++t) {
          pool.emplace_back([&, t] {
            threadIdx = Dim3{static_cast<unsigned>(t), 0, 0};
            blockIdx = Dim3{x, y, z};
            block = &b;
            tid = t;
            kernel();
          });
        }
        for (auto& th : pool) th.join();
      }
    }
  }
}

}  // namespace emu

#define LT_GLOBAL
#define LT_DEVICE inline
#define LT_LAUNCH_BOUNDS(n)
#define LT_DYNAMIC_SMEM(name) unsigned char* name = emu::block->smem.data()
#define LT_SYNCTHREADS() emu::syncthreads()
#define LT_SHFL_XOR(v, mask) emu::shfl_xor(v, mask)
#define LT_CP_ASYNC16(dst, src) emu::cp_async16(dst, src)
#define LT_CP_COMMIT() emu::cp_commit()
#define LT_CP_WAIT(n) emu::cp_wait(n)

#include "livetalk/sink_ring_kernel.cuh"

// The element types: bf16 (round to nearest even) and fp16 (_Float16), stored as their 16 bits.
struct Bf16 {
  uint16_t bits;
};
struct F16 {
  uint16_t bits;
};

inline float bf16_to_float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline uint16_t float_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if (std::isnan(f)) return 0x7fc0;
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
inline float f16_to_float(uint16_t b) {
  _Float16 h;
  std::memcpy(&h, &b, 2);
  return static_cast<float>(h);
}
inline uint16_t float_to_f16(float f) {
  const _Float16 h = static_cast<_Float16>(f);
  uint16_t b;
  std::memcpy(&b, &h, 2);
  return b;
}

namespace livetalk {

template <class T, float (*TO)(uint16_t), uint16_t (*FROM)(float)>
struct HostElt {
  static float to_float(T x) { return TO(x.bits); }
  static T from_float(float x) { return T{FROM(x)}; }
  static uint16_t bits(T x) { return x.bits; }
  static float bits_to_float(uint16_t b) { return TO(b); }
  static uint32_t pack(float lo, float hi) {
    return static_cast<uint32_t>(FROM(lo)) | (static_cast<uint32_t>(FROM(hi)) << 16);
  }
  static void mma(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
    emu::mma_16816<TO>(c, a, b0, b1);
  }
};
template <>
struct Elt<Bf16> : HostElt<Bf16, bf16_to_float, float_to_bf16> {};
template <>
struct Elt<F16> : HostElt<F16, f16_to_float, float_to_f16> {};

}  // namespace livetalk

namespace {

template <class T, int D, bool kPipelined>
int run(lt_sink_ring_args a, const std::vector<float>* src[7], std::vector<float>* out) {
  std::vector<T> buf[5];
  for (int i = 0; i < 5; ++i) {
    for (float f : *src[i]) buf[i].push_back(livetalk::Elt<T>::from_float(f));
  }
  std::vector<T> o(src[0]->size());
  std::vector<float> ws(livetalk::workspace_bytes(a.batch, a.block_len, a.heads, D, a.splits) / sizeof(float));
  a.q = buf[0].data();
  a.k = buf[1].data();
  a.v = buf[2].data();
  a.k_cache = buf[3].data();
  a.v_cache = buf[4].data();
  a.cos = src[5]->data();
  a.sin = src[6]->data();
  a.out = o.data();
  a.workspace = ws.empty() ? nullptr : ws.data();
  const Dim3 grid{static_cast<unsigned>((a.block_len + livetalk::kTileQueries - 1) / livetalk::kTileQueries),
                  static_cast<unsigned>(a.batch * a.heads), static_cast<unsigned>(a.splits)};
  emu::launch(grid, livetalk::kThreads, livetalk::kernel_smem_bytes<T, D, kPipelined>(),
              [&] { livetalk::sink_ring_kernel<T, D, kPipelined>(a); });
  if (a.splits > 1) {
    emu::launch(Dim3{static_cast<unsigned>(a.block_len), static_cast<unsigned>(a.batch * a.heads), 1}, D, 0,
                [&] { livetalk::combine_kernel<T, D>(a); });
  }
  for (const T& x : o) out->push_back(livetalk::Elt<T>::to_float(x));
  return 0;
}

template <class T, int D>
int by_variant(const lt_sink_ring_args& a, const std::vector<float>* src[7], std::vector<float>* out) {
  return a.variant == LT_VARIANT_SIMPLE ? run<T, D, false>(a, src, out) : run<T, D, true>(a, src, out);
}

template <class T>
int by_head_dim(const lt_sink_ring_args& a, const std::vector<float>* src[7], std::vector<float>* out) {
  switch (a.head_dim) {
    case 32: return by_variant<T, 32>(a, src, out);
    case 64: return by_variant<T, 64>(a, src, out);
    case 128: return by_variant<T, 128>(a, src, out);
    default: return 4;
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 6) {
    std::fprintf(stderr, "usage: kernel_emu IN OUT bf16|fp16 SM_COUNT pipelined|simple\n");
    return 1;
  }
  FILE* f = std::fopen(argv[1], "rb");
  int32_t h[9];
  if (!f || std::fread(h, sizeof(int32_t), 9, f) != 9) return 2;
  const size_t nblk = static_cast<size_t>(h[0]) * h[1] * h[2] * h[3], ncch = static_cast<size_t>(h[0]) * h[4] * h[2] * h[3];
  const size_t sizes[7] = {nblk, nblk, nblk, ncch, ncch, static_cast<size_t>(h[1]) * h[3] / 2,
                           static_cast<size_t>(h[1]) * h[3] / 2};
  std::vector<float> data[7];
  const std::vector<float>* src[7];
  for (int i = 0; i < 7; ++i) {
    data[i].resize(sizes[i]);
    if (std::fread(data[i].data(), sizeof(float), sizes[i], f) != sizes[i]) return 2;
    src[i] = &data[i];
  }
  std::fclose(f);
  const int32_t seg[2] = {h[6], h[7]};
  lt_sink_ring_args a{};
  a.seg = seg;
  a.batch = h[0];
  a.block_len = h[1];
  a.heads = h[2];
  a.head_dim = h[3];
  a.cache_len = h[4];
  a.sink_cap = h[5];
  a.variant = std::strcmp(argv[5], "simple") == 0 ? LT_VARIANT_SIMPLE : LT_VARIANT_PIPELINED;
  a.splits = livetalk::splits_for(a.batch, a.block_len, a.heads, a.cache_len, std::atoi(argv[4]));
  std::vector<float> out;
  const bool bf16 = std::strcmp(argv[3], "bf16") == 0;
  const int rc = bf16 ? by_head_dim<Bf16>(a, src, &out) : by_head_dim<F16>(a, src, &out);
  if (rc != 0) return rc;
  FILE* o = std::fopen(argv[2], "wb");
  if (!o || std::fwrite(out.data(), sizeof(float), out.size(), o) != out.size() ||
      std::fwrite(&a.splits, sizeof(int32_t), 1, o) != 1) {
    return 3;
  }
  std::fclose(o);
  return 0;
}
