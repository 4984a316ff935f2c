// A chunk's skip-gram pairs in a uniformly random order, for the data pipeline (lm_tying/data/streams.py).
//
// The pairs of every position with the positions of its window (the window drawn per position by the
// caller), each packed into one int64 as center << 32 | context, then shuffled. numpy's Fisher-Yates over
// the ~6M pairs of a 2^20-token chunk (48 MB) misses the caches at every swap; here each pair first goes
// to a random bucket of ~16k pairs (streaming writes), then every bucket is shuffled where it fits in the
// L2 cache. Sorting by i.i.d. keys gives a uniformly random permutation, and (bucket, then a uniform order
// within the bucket) is such a key, so the order is as random as one Fisher-Yates over the whole chunk.
//
// Pair k's bucket is draw k of the seed's stream and bucket b's shuffle takes the draws after those of the
// buckets before it (random.h: draw i is a function of (seed, i)), so threads can share out the positions and
// then the buckets and still give the one-thread order, whatever their number.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "pool.h"
#include "random.h"

using lm_tying::SplitMix64;

namespace {

// Calls emit(center << 32 | context) for every pair of positions [begin, end) of the n, position after position.
template <typename Emit>
inline void for_each_pair(const int32_t* tokens, const int32_t* windows, int64_t n, int64_t begin, int64_t end,
                          Emit emit) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t center = static_cast<int64_t>(tokens[i]) << 32, w = windows[i];
    const int64_t first = std::max<int64_t>(0, i - w), last = std::min(n - 1, i + w);
    for (int64_t j = first; j < i; ++j) emit(center | static_cast<uint32_t>(tokens[j]));
    for (int64_t j = i + 1; j <= last; ++j) emit(center | static_cast<uint32_t>(tokens[j]));
  }
}

}  // namespace

// tokens, windows: [n]; writes the pairs to out, whose length `count` the caller computed (sum over positions i
// of min(windows[i], i) + min(windows[i], n - 1 - i)); returns the number of pairs, or -1 if that is not count.
extern "C" int64_t skipgram_pairs(const int32_t* tokens, const int32_t* windows, int64_t n, uint64_t seed,
                                  int64_t* out, int64_t count, int threads) {
  int shift = 0;  // 2^shift buckets of at most ~16k pairs (128 KB)
  while (shift < 16 && (count >> shift) > (1 << 14)) ++shift;
  const int64_t buckets = int64_t{1} << shift;
  auto bucket_of = [shift](uint64_t bits) { return shift ? static_cast<int64_t>(bits >> (64 - shift)) : 0; };
  // Segments of positions (a few per thread), one task each; every segment's first pair number (its first draw)
  // from the pairs of the segments before it.
  const int64_t segments = std::max<int64_t>(1, std::min<int64_t>(4 * std::max(threads, 1), n / 65536));
  threads = static_cast<int>(std::min<int64_t>(std::max(threads, 1), segments));
  auto segment_begin = [&](int64_t s) { return n * s / segments; };
  std::vector<int64_t> first_pair(segments + 1, 0);
  lm_tying::parallel_for(threads, segments, [&](int64_t s) {
    int64_t pairs = 0;
    for (int64_t i = segment_begin(s); i < segment_begin(s + 1); ++i)
      pairs += std::min<int64_t>(windows[i], i) + std::min<int64_t>(windows[i], n - 1 - i);
    first_pair[s + 1] = pairs;
  });
  for (int64_t s = 0; s < segments; ++s) first_pair[s + 1] += first_pair[s];
  const int64_t total = first_pair[segments];
  if (total != count) return -1;
  // Two passes over the same draws: count each segment's pairs per bucket, then write every pair to its bucket's
  // next slot (a bucket holds the segments' pairs one segment after the other, as one thread would write them).
  std::vector<int64_t> fill(segments * buckets, 0);  // [segment][bucket]
  lm_tying::parallel_for(threads, segments, [&](int64_t s) {
    int64_t* mine = fill.data() + s * buckets;
    SplitMix64 draws{seed, static_cast<uint64_t>(first_pair[s])};
    for_each_pair(tokens, windows, n, segment_begin(s), segment_begin(s + 1),
                  [&](int64_t) { ++mine[bucket_of(draws.next())]; });
  });
  std::vector<int64_t> start(buckets + 1, 0);
  for (int64_t b = 0, at = 0; b < buckets; ++b) {
    start[b] = at;
    for (int64_t s = 0; s < segments; ++s) {
      const int64_t size = fill[s * buckets + b];
      fill[s * buckets + b] = at;
      at += size;
    }
    start[b + 1] = at;
  }
  lm_tying::parallel_for(threads, segments, [&](int64_t s) {
    int64_t* mine = fill.data() + s * buckets;
    SplitMix64 draws{seed, static_cast<uint64_t>(first_pair[s])};
    for_each_pair(tokens, windows, n, segment_begin(s), segment_begin(s + 1),
                  [&](int64_t pair) { out[mine[bucket_of(draws.next())]++] = pair; });
  });
  // Fisher-Yates within each bucket, on the stream's later draws: bucket b's start at total + the draws of the
  // buckets before it (a bucket of m pairs takes m - 1).
  std::vector<int64_t> first_draw(buckets + 1, total);
  for (int64_t b = 0; b < buckets; ++b)
    first_draw[b + 1] = first_draw[b] + std::max<int64_t>(0, start[b + 1] - start[b] - 1);
  const int64_t per_task = std::max<int64_t>(1, buckets / (8 * threads));
  lm_tying::parallel_for(threads, (buckets + per_task - 1) / per_task, [&](int64_t task) {
    for (int64_t b = task * per_task; b < std::min(buckets, (task + 1) * per_task); ++b) {
      int64_t* first = out + start[b];
      SplitMix64 draws{seed, static_cast<uint64_t>(first_draw[b])};
      for (int64_t i = start[b + 1] - start[b] - 1; i > 0; --i) std::swap(first[i], first[draws.below(i + 1)]);
    }
  });
  return total;
}
