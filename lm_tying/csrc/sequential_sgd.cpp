// Skip-gram negative sampling trained pair after pair, as word2vec C and gensim do, for CPU.
//
// For each pair (center c, context t) of a group, with the group's K negatives n_1..n_K, every value
// below read at the start of the pair (per-pair SGD: the gradient of the pair's loss, applied at once):
//
//   x = E[c]     s = <x, W[t]>     s_k = <x, W[n_k]>
//   loss  = softplus(-s) + neg_weight * sum_k softplus(s_k)
//   g = lr * (1 - sigmoid(s))        g_k = -lr * neg_weight * sigmoid(s_k)
//   E[c]   += g * W[t] + sum_k g_k * W[n_k]
//   W[t]   += g * x        W[n_k] += g_k * x          (a row drawn twice gets both steps)
//
// so the next pair already sees these rows updated: plain per-pair SGD, where the batched PyTorch step
// (engines.BatchedEngine) computes every gradient of an update from the same old values. A pair's rows
// are scored in one pass over x and updated in one more (one read and one write of each row), with the
// rows of the next pairs prefetched: the loop is bound by its loads and stores, and per-row passes (one
// for the score, one for E's step, one for W's) cost twice as much.
//
// Groups are shared out among `threads` threads (kept between calls), which update the shared tables without locks
// (Hogwild!, as word2vec C and gensim): with one thread the result is exactly the sequential one, with more
// a row hit by two threads at once may lose an update. Except W's first rows, the most frequent words' (the
// vocabulary's ids are in order of frequency), which every thread writes all the time as contexts and negatives:
// written from two cores, they would go back and forth between the cores' caches at every write. With more than
// one thread, each thread trains its own copy of them and, whenever the threads have trained kExchangePairs pairs
// since, adds its copy's change to W and copies W's rows again (as it leaves the call too): a thread sees the
// others' steps on these rows about kExchangePairs pairs late, and none is lost.
//
// The negatives are the caller's, or drawn here from the sampler's alias tables, group after group from one
// counter-based stream (random.h): the draws depend on the seed alone, not on the threads.
//
// Plain C++ with a C interface (called through ctypes): no torch headers, so it builds in a second or two.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "pool.h"
#include "random.h"

namespace {

constexpr int kBlock = 8;  // rows scored and updated in one pass (their accumulators fit in registers)

// Rows come at random from tables larger than the caches: request the next rows' cache lines while
// this pair computes, or every pair waits on memory.
inline void prefetch_row(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(row + i);
}

// s[r] = <x, rows[r]> for R rows in one pass over x.
#if defined(__AVX2__) && defined(__FMA__)
// GCC's vector extensions (clang has them too) rather than <immintrin.h>, whose parsing alone was a fifth of the
// build: 8 floats a register, multiply-adds contracted into FMAs, unaligned loads through an aligned(4) type.
typedef float f8 __attribute__((vector_size(32)));
typedef float f8_unaligned __attribute__((vector_size(32), aligned(4), may_alias));
inline f8 load8(const float* p) { return *reinterpret_cast<const f8_unaligned*>(p); }

template <int R>
inline void scores(const float* x, const float* const* rows, float* s, int64_t n) {
  f8 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = f8{};
  int64_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
    const f8 xv = load8(x + i0);
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[r] += xv * load8(rows[r] + i0);
  }
  // The 8 lanes summed in registers, halves first, in a loop unrolled at compile time: indexing acc[] with a
  // runtime r (as a tail loop over i would) keeps the accumulators in memory, one store each per step above.
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    const f8 a = acc[r];
    s[r] = ((a[0] + a[4]) + (a[2] + a[6])) + ((a[1] + a[5]) + (a[3] + a[7]));
  }
  for (int64_t i = i0; i < n; ++i)
    for (int r = 0; r < R; ++r) s[r] += x[i] * rows[r][i];
}
#else
template <int R>
inline void scores(const float* x, const float* const* rows, float* s, int64_t n) {
  float acc[R][8] = {};
  int64_t i0 = 0;
  for (; i0 + 8 <= n; i0 += 8) {
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
#pragma omp simd
      for (int j = 0; j < 8; ++j) acc[r][j] += x[i0 + j] * rows[r][i0 + j];
    }
  }
  for (int r = 0; r < R; ++r) {
    float total = 0.f;
    for (int j = 0; j < 8; ++j) total += acc[r][j];
    for (int64_t i = i0; i < n; ++i) total += x[i] * rows[r][i];
    s[r] = total;
  }
}
#endif

// x_out += sum_r g[r] * rows[r] and rows[r] += g[r] * x_in, in one pass (rows distinct; x_out may be x_in).
template <int R>
inline void update(const float* x_in, float* x_out, float* const* rows, const float* g, int64_t n) {
  // Local copies: a store to a row could, for all the compiler knows, change g or the pointers, which it
  // would then load again for every 8 floats.
  float step[R];
  float* row[R];
  for (int r = 0; r < R; ++r) step[r] = g[r], row[r] = rows[r];
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xi = x_in[i];
    float dx = 0.f;
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const float v = row[r][i];
      dx += step[r] * v;
      row[r][i] = v + step[r] * xi;
    }
    x_out[i] += dx;
  }
}

template <int R = kBlock>
inline void scores_block(int count, const float* x, const float* const* rows, float* s, int64_t n) {
  if constexpr (R > 1) {
    if (count < R) return scores_block<R - 1>(count, x, rows, s, n);
  }
  scores<R>(x, rows, s, n);
}

template <int R = kBlock>
inline void update_block(int count, const float* x_in, float* x_out, float* const* rows, const float* g, int64_t n) {
  if constexpr (R > 1) {
    if (count < R) return update_block<R - 1>(count, x_in, x_out, rows, g, n);
  }
  update<R>(x_in, x_out, rows, g, n);
}

// sigmoid(s) from e = exp(-|s|), which also gives softplus(s) = max(s, 0) + log(1 + e). The caller
// multiplies the (1 + e) factors (each at most 2) and takes one log now and then, not one per logit.
inline float sigmoid_from(float s, float e) { return s >= 0.f ? 1.f / (1.f + e) : e / (1.f + e); }

// Word2vec's zero-initialised output rows make denormal products, ~100x slower on x86. The mode is per
// thread: every thread running the kernel flushes them while it does and restores its mode afterwards.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved = __builtin_ia32_stmxcsr();
  FlushDenormals() { __builtin_ia32_ldmxcsr(saved | 0x8040); }  // flush-to-zero, denormals-are-zero
  ~FlushDenormals() { __builtin_ia32_ldmxcsr(saved); }
#endif
};

// W's first rows copied by each thread (up to this size: 256 rows at D = 128), and how often they meet in W.
constexpr int64_t kOwnRowsBytes = 128 << 10, kExchangePairs = 4096;

// A thread's copy of W's first rows: `rows` as it updates them, `taken` as they were in W when it copied them.
struct OwnRows {
  std::vector<float> rows, taken;

  // Adds the change since the last exchange to W's rows and copies them again (other threads' changes included);
  // one thread at a time, or two threads adding at once would lose one's changes.
  void exchange(float* W, std::mutex& one_at_a_time) {
    std::lock_guard<std::mutex> lock(one_at_a_time);
    for (size_t i = 0; i < rows.size(); ++i) {
      const float now = W[i] + (rows[i] - taken[i]);
      W[i] = now;
      rows[i] = taken[i] = now;
    }
  }
};

struct Problem {
  float* E;
  float* W;
  int64_t D, B, n, K, G;
  const int64_t *center, *context, *negatives;
  float rate, neg_weight;
  bool remove_accidental_hits;
  float* own_W = nullptr;  // this thread's copy of W's first `own_rows` rows, or null
  int64_t own_rows = 0;

  float* w_row(int64_t word) const { return word < own_rows ? own_W + word * D : W + word * D; }
};

// The loss (before the update) and the update of pair p, whose group's negatives are `negs`.
inline void train_pair(const Problem& P, int64_t p, const int64_t* negs, std::vector<float*>& rows,
                       std::vector<float>& s, std::vector<float>& g, std::vector<float>& x_in, double& linear,
                       double& true_factors, double& neg_factors) {
  const int64_t D = P.D, t = P.context[p];
  float* x = P.E + P.center[p] * D;
  // the distinct rows of the pair (a row drawn twice is one row with both steps), the true one first
  int count = 0;
  rows[count] = P.w_row(t);
  g[count++] = 0.f;
  for (int64_t k = 0; k < P.K; ++k) {
    if (P.remove_accidental_hits && negs[k] == t) continue;  // as word2vec C and gensim always do
    rows[count] = P.w_row(negs[k]);
    g[count++] = 0.f;
  }
  for (int j = 0; j < count; j += kBlock) scores_block(std::min(kBlock, count - j), x, &rows[j], &s[j], D);
  // the steps, from the scores; duplicates get their summed step on the first occurrence
  const float e = std::exp(-std::fabs(s[0]));
  g[0] = (1.f - sigmoid_from(s[0], e)) * P.rate;
  linear += std::max(s[0], 0.f) - s[0];  // softplus(-s) = softplus(s) - s
  true_factors *= 1.0 + e;
  int distinct = 1;
  for (int j = 1; j < count; ++j) {
    const float e_k = std::exp(-std::fabs(s[j]));
    linear += P.neg_weight * std::max(s[j], 0.f);
    neg_factors *= 1.0 + e_k;
    const float step = -sigmoid_from(s[j], e_k) * P.rate * P.neg_weight;
    int same = 0;
    while (same < distinct && rows[same] != rows[j]) ++same;
    if (same == distinct) rows[distinct++] = rows[j];
    g[same] += step;
  }
  if (P.rate == 0.f) return;  // the loss alone (an evaluation): nothing is written
  if (distinct <= kBlock) {
    update_block(distinct, x, x, rows.data(), g.data(), D);
  } else {  // several passes: every one reads x as it was before the pair
    std::copy(x, x + D, x_in.begin());
    for (int j = 0; j < distinct; j += kBlock)
      update_block(std::min(kBlock, distinct - j), x_in.data(), x, &rows[j], &g[j], D);
  }
}

}  // namespace

// embedding, output_weight: [V, D] float32, contiguous, updated in place; center, context: [B] int64;
// negatives: [n, K] int64, shared by consecutive groups of G = ceil(B / n) pairs; every id < V (the caller
// checks); or null: group g's K negatives are then draws g * K ... g * K + K - 1 of the stream of `seed`
// from the alias tables accept [V] (float64), alias [V] (see alias_draws). remove_accidental_hits skips a
// negative equal to the pair's context (as if its logit were -inf). Writes the summed loss of each group's
// pairs (each before its own update) to group_loss [n]. At lr 0 the tables are only read: the loss of every pair
// at the tables as they are.
extern "C" void sequential_sgd(float* embedding, float* output_weight, int64_t D, const int64_t* center,
                               const int64_t* context, int64_t B, const int64_t* negatives, const double* accept,
                               const int64_t* alias, int64_t V, uint64_t seed, int64_t n, int64_t K, float lr,
                               float neg_weight, int remove_accidental_hits, int threads, double* group_loss) {
  if (B == 0) return;
  const Problem shared{embedding, output_weight, D, B, n, K, (B + n - 1) / n, center, context, negatives, lr,
                       neg_weight, remove_accidental_hits != 0};
  threads = std::max(threads, 1);
  const int64_t own_rows =
      threads > 1 && lr != 0.f && D > 0 ? std::min(V, kOwnRowsBytes / (D * int64_t(sizeof(float)))) : 0;
  // Threads take chunks of groups from a shared counter (lm_tying::parallel_for's reason), keeping their buffers.
  const int64_t chunk = std::max<int64_t>(1, 256 / shared.G), chunks = (n + chunk - 1) / chunk;
  const int64_t exchange_chunks = std::max<int64_t>(1, kExchangePairs / (chunk * shared.G));
  std::atomic<int64_t> next{0};
  std::mutex exchanging;
  auto work = [&]() {
    FlushDenormals flush;
    Problem P = shared;
    OwnRows own;
    int64_t copied = next.load();  // chunks taken when this thread last copied W's rows
    if (own_rows > 0) {
      own.rows.assign(output_weight, output_weight + own_rows * D);
      own.taken = own.rows;
      P.own_W = own.rows.data();
      P.own_rows = own_rows;
    }
    std::vector<float*> rows(K + 1);
    std::vector<float> s(K + 1), g(K + 1), x_in(D);
    std::vector<int64_t> drawn(2 * K);  // this group's and the next group's draws
    auto group_negatives = [&](int64_t grp) -> const int64_t* {
      if (negatives != nullptr) return negatives + grp * K;
      int64_t* out = drawn.data() + (grp & 1) * K;
      lm_tying::alias_draws(seed, grp * K, K, accept, alias, V, out);
      return out;
    };
    for (int64_t taken = next++; taken < chunks; taken = next++) {
      if (own_rows > 0 && taken - copied >= exchange_chunks) {  // kExchangePairs since: also after a preemption
        own.exchange(output_weight, exchanging);
        copied = taken;
      }
      const int64_t begin = taken * chunk, end = std::min(n, begin + chunk);
      const int64_t* upcoming = group_negatives(begin);
      for (int64_t grp = begin; grp < end; ++grp) {
        const int64_t* negs = upcoming;
        if (grp + 1 < end) {
          upcoming = group_negatives(grp + 1);
          for (int64_t k = 0; k < K; ++k) prefetch_row(P.w_row(upcoming[k]), D);
        }
        double linear = 0.0, true_factors = 1.0, neg_factors = 1.0;  // loss = linear + log(factors)
        const int64_t last = std::min(B, (grp + 1) * P.G);
        for (int64_t p = grp * P.G; p < last; ++p) {
          if (p + 8 < B) {
            prefetch_row(embedding + center[p + 8] * D, D);
            prefetch_row(P.w_row(context[p + 8]), D);
          }
          train_pair(P, p, negs, rows, s, g, x_in, linear, true_factors, neg_factors);
          if (neg_factors > 1e200 || true_factors > 1e200) {  // long groups: fold the products in early
            linear += std::log(true_factors) + neg_weight * std::log(neg_factors);
            true_factors = neg_factors = 1.0;
          }
        }
        group_loss[grp] = linear + std::log(true_factors) + neg_weight * std::log(neg_factors);
      }
    }
    if (own_rows > 0) own.exchange(output_weight, exchanging);
  };
  lm_tying::pool().run(threads, work);
}

// out[i] = draw first + i of the stream of `seed` from the alias tables accept [V], alias [V], for i < count:
// the kernel's negatives for group g are draws g * K ... g * K + K - 1 (exposed to test and show them).
extern "C" void alias_draws(const double* accept, const int64_t* alias, int64_t V, uint64_t seed, int64_t first,
                            int64_t count, int64_t* out) {
  lm_tying::alias_draws(seed, first, count, accept, alias, V, out);
}
