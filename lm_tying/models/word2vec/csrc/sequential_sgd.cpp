// Skip-gram negative sampling trained pair after pair, as word2vec C and gensim do, for CPU.
//
// For each pair (center c, context t) of a group, with the group's K negatives n_1..n_K:
//
//   x = E[c]     s = <x, W[t]>     s_k = <x, W[n_k]>
//   loss  = softplus(-s) + neg_weight * sum_k softplus(s_k)
//   W[t]   += lr * (1 - sigmoid(s)) * x
//   W[n_k] -= lr * neg_weight * sigmoid(s_k) * x                  (each applied at once)
//   E[c]   += lr * ((1 - sigmoid(s)) * W[t] - neg_weight * sum_k sigmoid(s_k) * W[n_k])   (pre-update rows)
//
// so the next pair already sees these rows updated: plain per-pair SGD, where the batched PyTorch step
// (engines.BatchedEngine) computes every gradient of an update from the same old values. Groups are
// shared out among torch's intra-op threads, which update the shared tables without locks (Hogwild!, as
// word2vec C and gensim): with one thread the result is exactly the sequential one, with more a row hit
// by two threads at once may lose an update. Every row is worked on in L1 and the rows of the next pairs
// are prefetched; no temporary [B, D] tensor, no per-op dispatch, no GIL.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <vector>

#if defined(__SSE__)
#include <xmmintrin.h>
#endif

namespace {

inline float dot(const float* a, const float* b, int64_t n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

inline void axpy(float alpha, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

// Rows come at random from tables larger than the caches: request the next rows' cache lines while
// this pair computes, or every pair waits on memory.
inline void prefetch_row(const float* row, int64_t n) {
  for (int64_t i = 0; i < n; i += 16) __builtin_prefetch(row + i);
}

// sigmoid(s) from e = exp(-|s|), which also gives softplus(s) = max(s, 0) + log(1 + e). The caller
// multiplies the (1 + e) factors (each at most 2) and takes one log now and then, not one per logit.
inline float sigmoid_from(float s, float e) { return s >= 0.f ? 1.f / (1.f + e) : e / (1.f + e); }

// Word2vec's zero-initialised output rows make denormal products, ~100x slower on x86. The mode is per
// thread: every thread running the kernel flushes them while it does and restores its mode afterwards.
struct FlushDenormals {
#if defined(__SSE__)
  unsigned int saved = _mm_getcsr();
  FlushDenormals() { _mm_setcsr(saved | 0x8040); }  // flush-to-zero, denormals-are-zero
  ~FlushDenormals() { _mm_setcsr(saved); }
#endif
};

}  // namespace

// embedding, output_weight: [V, D] float32, contiguous, updated in place; center, context: [B] int64;
// negatives: [n, K] int64, shared by consecutive groups of G = ceil(B / n) pairs; remove_accidental_hits
// skips a negative equal to the pair's context (as if its logit were -inf). Returns the summed
// loss of the pairs (each before its own update), as a float64 scalar.
torch::Tensor sequential_sgd(torch::Tensor embedding, torch::Tensor output_weight, torch::Tensor center,
                             torch::Tensor context, torch::Tensor negatives, double lr, double neg_weight,
                             bool remove_accidental_hits) {
  TORCH_CHECK(embedding.device().is_cpu() && output_weight.device().is_cpu(), "the kernel runs on CPU tables");
  TORCH_CHECK(embedding.scalar_type() == torch::kFloat32 && output_weight.scalar_type() == torch::kFloat32,
              "tables must be float32");
  TORCH_CHECK(embedding.is_contiguous() && output_weight.is_contiguous() && embedding.sizes() == output_weight.sizes(),
              "tables must be contiguous and of the same shape");
  TORCH_CHECK(center.scalar_type() == torch::kInt64 && context.scalar_type() == torch::kInt64 &&
                  negatives.scalar_type() == torch::kInt64 && negatives.dim() == 2,
              "center and context must be int64 [B], negatives int64 [groups, K]");
  center = center.contiguous();
  context = context.contiguous();
  negatives = negatives.contiguous();
  const int64_t V = embedding.size(0), D = embedding.size(1);
  const int64_t B = center.numel(), n = negatives.size(0), K = negatives.size(1);
  TORCH_CHECK(context.numel() == B, "center and context differ in length");
  if (B == 0) return torch::zeros({}, torch::kFloat64);
  const int64_t G = (B + n - 1) / n;
  TORCH_CHECK(n >= 1 && (n - 1) * G < B, "negatives has more groups than the batch has pairs");
  for (const torch::Tensor& ids : {center, context, negatives}) {
    TORCH_CHECK(ids.min().item<int64_t>() >= 0 && ids.max().item<int64_t>() < V, "word id out of range");
  }

  float* E = embedding.data_ptr<float>();
  float* W = output_weight.data_ptr<float>();
  const int64_t* c = center.data_ptr<int64_t>();
  const int64_t* t = context.data_ptr<int64_t>();
  const int64_t* neg = negatives.data_ptr<int64_t>();
  const float rate = static_cast<float>(lr), w = static_cast<float>(neg_weight);
  std::vector<double> group_loss(n, 0.0);
  {
    pybind11::gil_scoped_release no_gil;
    // Threads take chunks of groups from a shared counter rather than a fixed half each: on a VM whose
    // vCPUs get descheduled a static split makes the whole call wait for the slowest thread.
    const int64_t chunk = std::max<int64_t>(1, 256 / G), chunks = (n + chunk - 1) / chunk;
    std::atomic<int64_t> next{0};
    at::parallel_for(0, at::get_num_threads(), 1, [&](int64_t, int64_t) {
      FlushDenormals flush;
      std::vector<float> d_x(D);  // the update of E[c], from the rows as they were before this pair
      for (int64_t taken = next++; taken < chunks; taken = next++) {
        const int64_t begin = taken * chunk, end = std::min(n, begin + chunk);
        for (int64_t g = begin; g < end; ++g) {
          const int64_t* negs = neg + g * K;
          if (g + 1 < end) {
            for (int64_t k = 0; k < K; ++k) prefetch_row(W + negs[K + k] * D, D);
          }
          double linear = 0.0, true_factors = 1.0, neg_factors = 1.0;  // loss = linear + log(factors)
          const int64_t last = std::min(B, (g + 1) * G);
          for (int64_t p = g * G; p < last; ++p) {
            if (p + 8 < B) {
              prefetch_row(E + c[p + 8] * D, D);
              prefetch_row(W + t[p + 8] * D, D);
            }
            float* x = E + c[p] * D;
            float* wt = W + t[p] * D;
            const float s = dot(x, wt, D);
            const float e = std::exp(-std::fabs(s));
            const float g_true = (1.f - sigmoid_from(s, e)) * rate;
            linear += std::max(s, 0.f) - s;  // softplus(-s) = softplus(s) - s
            true_factors *= 1.0 + e;
            std::fill(d_x.begin(), d_x.end(), 0.f);
            axpy(g_true, wt, d_x.data(), D);
            axpy(g_true, x, wt, D);
            for (int64_t k = 0; k < K; ++k) {
              if (remove_accidental_hits && negs[k] == t[p]) continue;  // as word2vec C and gensim always do
              float* wk = W + negs[k] * D;
              const float s_k = dot(x, wk, D);
              const float e_k = std::exp(-std::fabs(s_k));
              const float g_k = -sigmoid_from(s_k, e_k) * rate * w;
              linear += w * std::max(s_k, 0.f);
              neg_factors *= 1.0 + e_k;
              axpy(g_k, wk, d_x.data(), D);
              axpy(g_k, x, wk, D);
            }
            axpy(1.f, d_x.data(), x, D);
            if (neg_factors > 1e200 || true_factors > 1e200) {  // long groups: fold the products in early
              linear += std::log(true_factors) + w * std::log(neg_factors);
              true_factors = neg_factors = 1.0;
            }
          }
          group_loss[g] = linear + std::log(true_factors) + w * std::log(neg_factors);
        }
      }
    });
  }
  double total = 0.0;
  for (double loss : group_loss) total += loss;
  return torch::tensor(total, torch::kFloat64);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("sequential_sgd", &sequential_sgd, "Per-pair SGD of skip-gram negative sampling (CPU, lock-free threads)");
}
