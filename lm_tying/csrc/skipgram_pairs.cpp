// A chunk's skip-gram pairs in a uniformly random order, for the data pipeline (lm_tying/data/streams.py).
//
// The pairs of every position with the positions of its window (the window drawn per position by the
// caller), each packed into one int64 as center << 32 | context, then shuffled. numpy's Fisher-Yates over
// the ~6M pairs of a 2^20-token chunk (48 MB) misses the caches at every swap; here each pair first goes
// to a random bucket of ~16k pairs (streaming writes), then every bucket is shuffled where it fits in the
// L2 cache. Sorting by i.i.d. keys gives a uniformly random permutation, and (bucket, then a uniform order
// within the bucket) is such a key, so the order is as random as one Fisher-Yates over the whole chunk.

#include <algorithm>
#include <cstdint>
#include <vector>

#include "random.h"

using lm_tying::SplitMix64;

// Calls emit(center << 32 | context) for every pair, position after position.
template <typename Emit>
inline void for_each_pair(const int32_t* tokens, const int32_t* windows, int64_t n, Emit emit) {
  for (int64_t i = 0; i < n; ++i) {
    const int64_t center = static_cast<int64_t>(tokens[i]) << 32, w = windows[i];
    const int64_t first = std::max<int64_t>(0, i - w), last = std::min(n - 1, i + w);
    for (int64_t j = first; j < i; ++j) emit(center | static_cast<uint32_t>(tokens[j]));
    for (int64_t j = i + 1; j <= last; ++j) emit(center | static_cast<uint32_t>(tokens[j]));
  }
}

// tokens, windows: [n]; writes the pairs to out, whose length `count` the caller computed (sum over positions i
// of min(windows[i], i) + min(windows[i], n - 1 - i)); returns the number of pairs, or -1 if that is not count.
extern "C" int64_t skipgram_pairs(const int32_t* tokens, const int32_t* windows, int64_t n, uint64_t seed,
                                  int64_t* out, int64_t count) {
  int shift = 0;  // 2^shift buckets of at most ~16k pairs (128 KB)
  while (shift < 16 && (count >> shift) > (1 << 14)) ++shift;
  const int64_t buckets = int64_t{1} << shift;
  auto bucket_of = [shift](uint64_t bits) { return shift ? static_cast<int64_t>(bits >> (64 - shift)) : 0; };
  // Two passes over the same draws: count each bucket's pairs, then write every pair to its bucket's next slot
  // (no pair array in window order is kept).
  std::vector<int64_t> start(static_cast<size_t>(buckets) + 1, 0);
  SplitMix64 draws{seed};
  int64_t total = 0;
  for_each_pair(tokens, windows, n, [&](int64_t) { ++start[bucket_of(draws.next()) + 1]; ++total; });
  if (total != count) return -1;
  for (int64_t b = 0; b < buckets; ++b) start[b + 1] += start[b];
  std::vector<int64_t> fill(start.begin(), start.end() - 1);
  draws.i = 0;
  for_each_pair(tokens, windows, n, [&](int64_t pair) { out[fill[bucket_of(draws.next())]++] = pair; });
  for (int64_t b = 0; b < buckets; ++b) {  // Fisher-Yates within each bucket, on the stream's later draws
    int64_t* first = out + start[b];
    for (int64_t i = start[b + 1] - start[b] - 1; i > 0; --i) std::swap(first[i], first[draws.below(i + 1)]);
  }
  return total;
}
