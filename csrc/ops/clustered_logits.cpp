#include "ops/clustered_logits.h"

#include <algorithm>
#include <numeric>

#include "ops/ops.h"

namespace pg4 {

std::vector<int32_t> top_clusters(const float* scores, int n_clusters, int top_k) {
  std::vector<int32_t> order(n_clusters);
  std::iota(order.begin(), order.end(), 0);
  std::partial_sort(order.begin(), order.begin() + top_k, order.end(),
                    [scores](int32_t a, int32_t b) {
                      return scores[a] > scores[b] || (scores[a] == scores[b] && a < b);
                    });
  order.resize(top_k);
  return order;
}

std::vector<int32_t> cluster_tokens(const int32_t* clusters, int cluster_size,
                                    const std::vector<int32_t>& chosen) {
  std::vector<int32_t> tokens;
  tokens.reserve(chosen.size() * cluster_size);
  for (const int32_t c : chosen) {
    const int32_t* row = clusters + static_cast<size_t>(c) * cluster_size;
    tokens.insert(tokens.end(), row, row + cluster_size);
  }
  return tokens;
}

void masked_row(const int32_t* candidates, const float* scores, int n_candidates, int64_t vocab,
                float* logits) {
  const float lowest = *std::min_element(scores, scores + n_candidates);
  std::fill(logits, logits + vocab, lowest - 1.0f);
  for (int j = 0; j < n_candidates; ++j) logits[candidates[j]] = scores[j];
}

void Ops::clustered_logits(const Weight& table, const float* x, int n, const float* scores,
                           int n_clusters, int top_k, const int32_t* clusters, int cluster_size,
                           float* logits) {
  const int64_t vocab = table.rows();
  matmul(table, x, n, logits);
  std::vector<float> all(static_cast<size_t>(n) * vocab);
  std::vector<float> host_scores(static_cast<size_t>(n) * n_clusters);
  std::vector<int32_t> host_clusters(static_cast<size_t>(n_clusters) * cluster_size);
  read(logits, all.size(), all.data());
  read(scores, host_scores.size(), host_scores.data());
  read_ids(clusters, host_clusters.size(), host_clusters.data());
  for (int r = 0; r < n; ++r) {
    float* row = all.data() + static_cast<size_t>(r) * vocab;
    const std::vector<int32_t> tokens = cluster_tokens(
        host_clusters.data(), cluster_size,
        top_clusters(host_scores.data() + static_cast<size_t>(r) * n_clusters, n_clusters, top_k));
    std::vector<float> chosen(tokens.size());
    for (size_t j = 0; j < tokens.size(); ++j) chosen[j] = row[tokens[j]];
    masked_row(tokens.data(), chosen.data(), static_cast<int>(tokens.size()), vocab, row);
  }
  upload(logits, all.data(), all.size() * sizeof(float));
}

}  // namespace pg4
