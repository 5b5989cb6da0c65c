// The host-side steps of Ops::clustered_logits (the centroid-masked output head), shared by the
// interface's default and the CPU backend.
#pragma once

#include <cstdint>
#include <vector>

namespace pg4 {

// The top_k of n_clusters scores, highest first (the lower index first on ties).
std::vector<int32_t> top_clusters(const float* scores, int n_clusters, int top_k);

// The tokens of the chosen clusters, in their order: the rows `chosen` of `clusters`, each
// cluster_size token ids.
std::vector<int32_t> cluster_tokens(const int32_t* clusters, int cluster_size,
                                    const std::vector<int32_t>& chosen);

// One row of `vocab` logits: scores[j] for token candidates[j], the lowest of those scores
// minus 1 for every other token.
void masked_row(const int32_t* candidates, const float* scores, int n_candidates, int64_t vocab,
                float* logits);

}  // namespace pg4
