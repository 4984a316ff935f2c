// The kernels' random numbers: SplitMix64 (Steele, Lea and Flood 2014), a counter-based generator whose
// i-th output is a fixed function of (seed, i), so that a draw does not depend on which thread makes it.
#pragma once

#include <cstdint>

namespace lm_tying {

constexpr uint64_t kGolden = 0x9e3779b97f4a7c15ULL;

// The i-th output of the stream of `seed` (i = 0, 1, ...).
inline uint64_t splitmix64(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * kGolden;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
  return z ^ (z >> 31);
}

// Successive outputs of one stream.
struct SplitMix64 {
  uint64_t seed, i = 0;
  uint64_t next() { return splitmix64(seed, i++); }
  // Uniform on [0, n) (Lemire's multiply-shift; the bias, n / 2^64, is far below anything measurable here).
  uint64_t below(uint64_t n) { return static_cast<uint64_t>((static_cast<unsigned __int128>(next()) * n) >> 64); }
};

// A uniform double in [0, 1) from the top 53 bits of a draw (as torch.rand's float64).
inline double unit_double(uint64_t bits) { return static_cast<double>(bits >> 11) * 0x1.0p-53; }

// Walker's alias method: a uniform u in [0, V) picks column floor(u), whose fractional part keeps that
// class with probability accept[k] and gives alias[k] otherwise (nce.UnigramSampler.draw, in float64).
inline int64_t alias_draw(uint64_t bits, const double* accept, const int64_t* alias, int64_t V) {
  const double u = unit_double(bits) * static_cast<double>(V);
  int64_t k = static_cast<int64_t>(u);
  if (k > V - 1) k = V - 1;
  return (u - static_cast<double>(k)) < accept[k] ? k : alias[k];
}

// out[i] = the alias draw of output first + i of the stream of `seed`, for i < count.
inline void alias_draws(uint64_t seed, int64_t first, int64_t count, const double* accept, const int64_t* alias,
                        int64_t V, int64_t* out) {
  for (int64_t i = 0; i < count; ++i) out[i] = alias_draw(splitmix64(seed, first + i), accept, alias, V);
}

}  // namespace lm_tying
