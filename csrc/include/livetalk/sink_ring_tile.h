// The tile logic of the sink + ring attention kernel, shared by the CUDA kernel
// (sink_ring_kernel.cuh) and a host build (tests/tile_host.cpp) that the test suite runs
// against the Python reference: which cache or block row a key comes from, which keys a split
// covers, the RoPE rotation of a channel pair, and the online-softmax / split-combine arithmetic.
//
// The key sequence a block's queries attend, in logical order:
//   [ sinks: sink_len valid of sink_cap | ring: ring_len valid of cache_len - sink_cap | block ]
// Valid slots are a prefix of each segment (BlockKVCache fills the sinks, then the ring, from slot
// 0; a full ring is valid everywhere), so two lengths describe every state: no mask is read.
// Cached keys are stored rotated; the block's own keys (and the queries) are rotated on load.
#pragma once

#include <math.h>

#if defined(__CUDACC__)
#define LT_HD __host__ __device__ __forceinline__
#else
#define LT_HD inline
#endif

namespace livetalk {

constexpr int kTileQueries = 64;  // queries per CTA (4 warps x 16 rows)
constexpr int kTileKeys = 64;     // keys per K/V tile
constexpr int kMaxSplits = 16;

struct Segments {
  int sink_len;   // valid sink tokens
  int ring_len;   // valid ring tokens
  int sink_cap;   // sink capacity: where the ring starts in the cache
  int cache_len;  // cached tokens (sinks + ring capacity)
  int block_len;  // the block's own tokens (always attended)

  LT_HD int total() const { return sink_len + ring_len + block_len; }
};

// Lengths as read from the op's `seg` input, clamped into the cache (a bad seg never reads out of
// bounds; the Python op checks it and raises before the kernel runs).
LT_HD Segments make_segments(int sink_len, int ring_len, int sink_cap, int cache_len, int block_len) {
  Segments s;
  s.sink_cap = sink_cap;
  s.cache_len = cache_len;
  s.block_len = block_len;
  s.sink_len = sink_len < 0 ? 0 : (sink_len > sink_cap ? sink_cap : sink_len);
  int ring_cap = cache_len - sink_cap;
  s.ring_len = ring_len < 0 ? 0 : (ring_len > ring_cap ? ring_cap : ring_len);
  return s;
}

enum KeySource { kFromCache = 0, kFromBlock = 1 };

struct KeyRow {
  int source;  // KeySource
  int row;     // token row in the cache (B, cache_len, H, D) or in the block (B, block_len, H, D)
};

// Logical key j (0 <= j < total()) -> where its K/V row lives.
LT_HD KeyRow key_row(const Segments& s, int j) {
  KeyRow r;
  if (j < s.sink_len) {
    r.source = kFromCache;
    r.row = j;
  } else if (j < s.sink_len + s.ring_len) {
    r.source = kFromCache;
    r.row = s.sink_cap + (j - s.sink_len);
  } else {
    r.source = kFromBlock;
    r.row = j - s.sink_len - s.ring_len;
  }
  return r;
}

struct KeyRange {
  int lo, hi;  // logical keys [lo, hi); empty when lo >= hi
};

// The keys split `split` of `splits` covers: whole tiles, as even as possible, the last tile cut
// at `total`. The grid is sized from the largest total (the seg lengths live on the device); a
// split past the valid keys gets an empty range and contributes nothing to the combine.
LT_HD KeyRange split_range(int total, int splits, int split) {
  int tiles = (total + kTileKeys - 1) / kTileKeys;
  int per = (tiles + splits - 1) / splits;
  int t0 = split * per < tiles ? split * per : tiles;
  int t1 = (split + 1) * per < tiles ? (split + 1) * per : tiles;
  KeyRange r;
  r.lo = t0 * kTileKeys;
  r.hi = t1 * kTileKeys < total ? t1 * kTileKeys : total;
  if (r.hi < r.lo) r.hi = r.lo;
  return r;
}

// Splits of the key sequence per query tile: enough CTAs for two waves over the GPU, at most one
// split per key tile and kMaxSplits. Large blocks (1.3B: 48 query tiles x 12 heads) get 1.
LT_HD int choose_splits(int query_tiles, int batch_heads, int max_keys, int sm_count) {
  int ctas = query_tiles * batch_heads;
  int want = (2 * sm_count + ctas - 1) / ctas;
  int tiles = (max_keys + kTileKeys - 1) / kTileKeys;
  if (want > tiles) want = tiles;
  if (want > kMaxSplits) want = kMaxSplits;
  return want < 1 ? 1 : want;
}

// RoPE of one adjacent channel pair (2p, 2p+1) with the token's cos/sin table entry p, in fp32:
// the rotation models/rope.apply_rope applies.
LT_HD void rope_pair(float x0, float x1, float c, float s, float* y0, float* y1) {
  *y0 = x0 * c - x1 * s;
  *y1 = x0 * s + x1 * c;
}

// Scores are kept in log2 units: s2 = (q . k) * log2(e) / sqrt(D), so exp(score) = exp2(s2).
LT_HD float score_scale_log2(int head_dim) { return 1.4426950408889634f / sqrtf((float)head_dim); }

// Online softmax over tiles, per query row: running max m (log2 units) and running sum l.
struct RowState {
  float m;
  float l;
};

LT_HD RowState row_start() {
  RowState st;
  st.m = -INFINITY;
  st.l = 0.f;
  return st;
}

// A tile whose largest score is tile_max arrives: the new running max, and the factor the sum and
// the output accumulator are rescaled by (0 when nothing was accumulated yet).
LT_HD float row_rescale(RowState* st, float tile_max) {
  float m_new = st->m > tile_max ? st->m : tile_max;
  float alpha = st->m == -INFINITY ? 0.f : exp2f(st->m - m_new);
  st->m = m_new;
  st->l *= alpha;
  return alpha;
}

// The unnormalised probability of a score under the running max (a masked score is -inf: 0).
LT_HD float row_prob(const RowState& st, float s2) {
  return (s2 == -INFINITY || st.m == -INFINITY) ? 0.f : exp2f(s2 - st.m);
}

// Split combine: each split leaves (m, l, acc = sum p v); the weight of a split under the largest m.
LT_HD float combine_weight(float m_split, float m_max) {
  return m_split == -INFINITY ? 0.f : exp2f(m_split - m_max);
}

}  // namespace livetalk
