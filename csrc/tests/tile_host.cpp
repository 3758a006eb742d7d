// Host build of the kernel's tile logic (sink_ring_tile.h), run by tests/test_csrc.py.
//
//   tile_host attention IN OUT   IN: int32 header [B, Nb, H, D, Np, sink_cap, sink_len, ring_len,
//                                splits] then fp32 q, k, v (B, Nb, H, D), k_cache, v_cache
//                                (B, Np, H, D), cos, sin (Nb, D/2). OUT: fp32 (B, Nb, H, D).
//   tile_host layout SINK_LEN RING_LEN SINK_CAP CACHE_LEN BLOCK_LEN SPLITS
//                                prints "key j source row" per key, then "split s lo hi" per split.
//
// `attention` walks the kernel's loops in fp32 (query tiles, each split's 64-key tiles in logical
// key order, rows fetched through key_row, queries and block keys rotated with rope_pair, the
// online softmax's rescale/prob per tile, the split combine) without tensor cores or warps.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "livetalk/sink_ring_tile.h"

using livetalk::KeyRange;
using livetalk::KeyRow;
using livetalk::RowState;
using livetalk::Segments;

namespace {

struct Inputs {
  int b, nb, h, d, np, sink_cap, sink_len, ring_len, splits;
  std::vector<float> q, k, v, kc, vc, cos, sin;
};

bool read_floats(FILE* f, std::vector<float>* x, size_t n) {
  x->resize(n);
  return fread(x->data(), sizeof(float), n, f) == n;
}

int attention(const char* in_path, const char* out_path) {
  FILE* f = fopen(in_path, "rb");
  if (!f) return 2;
  int32_t hdr[9];
  if (fread(hdr, sizeof(int32_t), 9, f) != 9) return 2;
  Inputs in{hdr[0], hdr[1], hdr[2], hdr[3], hdr[4], hdr[5], hdr[6], hdr[7], hdr[8], {}, {}, {}, {}, {}, {}, {}};
  const size_t nblk = static_cast<size_t>(in.b) * in.nb * in.h * in.d;
  const size_t ncch = static_cast<size_t>(in.b) * in.np * in.h * in.d;
  const int p = in.d / 2;
  bool ok = read_floats(f, &in.q, nblk) && read_floats(f, &in.k, nblk) && read_floats(f, &in.v, nblk) &&
            read_floats(f, &in.kc, ncch) && read_floats(f, &in.vc, ncch) &&
            read_floats(f, &in.cos, static_cast<size_t>(in.nb) * p) &&
            read_floats(f, &in.sin, static_cast<size_t>(in.nb) * p);
  fclose(f);
  if (!ok) return 2;

  const Segments seg = livetalk::make_segments(in.sink_len, in.ring_len, in.sink_cap, in.np, in.nb);
  const float scale = livetalk::score_scale_log2(in.d);
  const size_t tok = static_cast<size_t>(in.h) * in.d;
  std::vector<float> out(nblk, 0.f), qrot(in.d), krow(in.d), vrow(in.d);
  std::vector<float> acc(static_cast<size_t>(in.splits) * in.d), sc(livetalk::kTileKeys);
  std::vector<RowState> part(in.splits);

  auto rotate = [&](const float* src, int row, float* dst) {
    for (int i = 0; i < p; ++i) livetalk::rope_pair(src[2 * i], src[2 * i + 1], in.cos[row * p + i],
                                                    in.sin[row * p + i], &dst[2 * i], &dst[2 * i + 1]);
  };
  for (int b = 0; b < in.b; ++b) {
    for (int hh = 0; hh < in.h; ++hh) {
      const size_t blk0 = static_cast<size_t>(b) * in.nb * tok + static_cast<size_t>(hh) * in.d;
      const size_t cch0 = static_cast<size_t>(b) * in.np * tok + static_cast<size_t>(hh) * in.d;
      for (int qi = 0; qi < in.nb; ++qi) {
        rotate(&in.q[blk0 + qi * tok], qi, qrot.data());
        for (int s = 0; s < in.splits; ++s) {
          const KeyRange r = livetalk::split_range(seg.total(), in.splits, s);
          RowState st = livetalk::row_start();
          float* a = &acc[static_cast<size_t>(s) * in.d];
          std::memset(a, 0, sizeof(float) * in.d);
          for (int k0 = r.lo; k0 < r.hi; k0 += livetalk::kTileKeys) {
            float tmax = -INFINITY;
            for (int c = 0; c < livetalk::kTileKeys; ++c) {
              const int j = k0 + c;
              sc[c] = -INFINITY;
              if (j >= r.hi) continue;
              const KeyRow src = livetalk::key_row(seg, j);
              if (src.source == livetalk::kFromCache) {
                std::memcpy(krow.data(), &in.kc[cch0 + src.row * tok], sizeof(float) * in.d);
              } else {
                rotate(&in.k[blk0 + src.row * tok], src.row, krow.data());
              }
              float dot = 0.f;
              for (int e = 0; e < in.d; ++e) dot += qrot[e] * krow[e];
              sc[c] = dot * scale;
              tmax = sc[c] > tmax ? sc[c] : tmax;
            }
            const float alpha = livetalk::row_rescale(&st, tmax);
            for (int e = 0; e < in.d; ++e) a[e] *= alpha;
            for (int c = 0; c < livetalk::kTileKeys && k0 + c < r.hi; ++c) {
              const float pr = livetalk::row_prob(st, sc[c]);
              st.l += pr;
              const KeyRow src = livetalk::key_row(seg, k0 + c);
              const float* vr = src.source == livetalk::kFromCache ? &in.vc[cch0 + src.row * tok]
                                                                   : &in.v[blk0 + src.row * tok];
              for (int e = 0; e < in.d; ++e) a[e] += pr * vr[e];
            }
          }
          part[s] = st;
        }
        float m_max = -INFINITY;
        for (int s = 0; s < in.splits; ++s) m_max = part[s].m > m_max ? part[s].m : m_max;
        float den = 0.f;
        for (int s = 0; s < in.splits; ++s) den += livetalk::combine_weight(part[s].m, m_max) * part[s].l;
        for (int e = 0; e < in.d; ++e) {
          float num = 0.f;
          for (int s = 0; s < in.splits; ++s) {
            num += livetalk::combine_weight(part[s].m, m_max) * acc[static_cast<size_t>(s) * in.d + e];
          }
          out[blk0 + qi * tok + e] = den > 0.f ? num / den : 0.f;
        }
      }
    }
  }
  FILE* o = fopen(out_path, "wb");
  if (!o || fwrite(out.data(), sizeof(float), out.size(), o) != out.size()) return 3;
  fclose(o);
  return 0;
}

int layout(char** argv) {
  const int v[6] = {atoi(argv[0]), atoi(argv[1]), atoi(argv[2]), atoi(argv[3]), atoi(argv[4]), atoi(argv[5])};
  const Segments seg = livetalk::make_segments(v[0], v[1], v[2], v[3], v[4]);
  for (int j = 0; j < seg.total(); ++j) {
    const KeyRow r = livetalk::key_row(seg, j);
    printf("key %d %d %d\n", j, r.source, r.row);
  }
  for (int s = 0; s < v[5]; ++s) {
    const KeyRange r = livetalk::split_range(seg.total(), v[5], s);
    printf("split %d %d %d\n", s, r.lo, r.hi);
  }
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  if (argc == 4 && std::strcmp(argv[1], "attention") == 0) return attention(argv[2], argv[3]);
  if (argc == 8 && std::strcmp(argv[1], "layout") == 0) return layout(argv + 2);
  std::fprintf(stderr, "usage: tile_host attention IN OUT | tile_host layout SINK_LEN RING_LEN SINK_CAP "
                       "CACHE_LEN BLOCK_LEN SPLITS\n");
  return 1;
}
