#include "ops/cpu/cpu_ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>

#include "ops/clustered_logits.h"
#include "ops/cpu/fast_exp.h"
#include "quant/interleaved.h"
#include "quant/quant.h"

namespace pg4 {

namespace {

// Work items below these sizes are not worth handing to another thread.
constexpr int64_t kElementGrain = 16384;
// Batches from this many tokens on take the float weights' register tiles: below it, the widened
// copy of the weights costs what the tiles save (2048 x 2048 F16 and F32, one core: even at 8
// tokens, 15-40% faster at 16 and 32). A decode step's single token keeps the row kernel.
constexpr int kMinTileTokens = 8;

// tanh to a few ulp, vectorisable like fast_exp (std::tanh over the vocabulary's logits of
// several verified tokens cost a tenth of a decode step): (1 - e^-2a) / (1 + e^-2a) for a = |z|,
// and below a = 1/4, where 1 - e^-2a cancels, the odd Taylor series to z^9.
inline float fast_tanh(float z) {
  const float a = std::fabs(z);
  const float e = fast_exp(-2.0f * a);
  const float by_exp = (1.0f - e) / (1.0f + e);
  const float a2 = a * a;
  const float series =
      a + a * a2 * (-1.0f / 3 + a2 * (2.0f / 15 + a2 * (-17.0f / 315 + a2 * (62.0f / 2835))));
  return std::copysign(a < 0.25f ? series : by_exp, z);
}

// The tanh approximation of GELU, as x * sigmoid(2u): 0.5 x (1 + tanh u) without the
// cancellation of 1 + tanh u for negative u.
inline float gelu_tanh(float x) {
  constexpr float kSqrt2OverPi = 0.7978845608028654f;
  const float u = kSqrt2OverPi * (x + 0.044715f * x * x * x);
  return x / (1.0f + fast_exp(-2.0f * u));
}

}  // namespace

CpuOps::CpuOps(int n_threads, quant::Isa isa) : pool_(n_threads), isa_(isa) {}

void CpuOps::place_weights(const std::vector<WeightPlacement>& weights, const MappedFile* file) {
  constexpr int kRows = quant::kInterleavedRows;
  for (const WeightPlacement& placement : weights) {
    Weight& w = *placement.weight;
    if (placement.host_resident) {
      // Only gathered from, never multiplied.
      if (file != nullptr) file->keep_resident(w.data, w.count() / w.cols() * w.row_bytes);
      continue;
    }
    if (w.rows() % kRows != 0 || quant::interleaved_dot_fn(w.type, isa_) == nullptr) {
      continue;
    }
    const int64_t n_groups = w.count() / w.cols() / kRows;
    const size_t group_bytes = kRows * w.row_bytes;
    std::unique_ptr<uint8_t[]> copy(new uint8_t[n_groups * group_bytes]);  // not zeroed
    uint8_t* dst = copy.get();
    constexpr int64_t kGroupsPerRead = 64;
    pool_.parallel_for(n_groups, kGroupsPerRead, [&](int64_t begin, int64_t end, int) {
      std::vector<uint8_t> rows((end - begin) * group_bytes);
      const uint8_t* src = w.data + begin * group_bytes;
      if (file != nullptr) {
        file->read(src, rows.size(), rows.data());
      } else {
        std::memcpy(rows.data(), src, rows.size());
      }
      for (int64_t g = begin; g < end; ++g) {
        quant::interleave_rows(w.type, rows.data() + (g - begin) * group_bytes, w.row_bytes,
                               w.cols(), dst + g * group_bytes);
      }
    });
    w.interleaved = dst;
    interleaved_.push_back(std::move(copy));
  }
}

std::shared_ptr<float> CpuOps::alloc(size_t n) {
  return std::shared_ptr<float>(new float[n](), std::default_delete<float[]>());
}

std::shared_ptr<int32_t> CpuOps::alloc_ids(size_t n) {
  return std::shared_ptr<int32_t>(new int32_t[n](), std::default_delete<int32_t[]>());
}

void CpuOps::matmul(const Weight& w, const float* x, int n_tokens, float* y) {
  const Product product{&w, y};
  matmul_shared(x, n_tokens, &product, 1);
}

void CpuOps::matmul_shared(const float* x, int n_tokens, const Product* products, int n_products) {
  const int64_t cols = shared_input_width(products, n_products);
  auto activation_of = [&](int i) { return quant::type_info(products[i].weight->type).activation; };
  // The products go in groups of one activation format, each group after one conversion of x.
  for (int first = 0; first < n_products; ++first) {
    const quant::Type act_type = activation_of(first);
    bool converted_before = false;
    for (int i = 0; i < first; ++i) converted_before |= activation_of(i) == act_type;
    if (converted_before) continue;
    const size_t act_row_bytes = quant::row_bytes(act_type, cols);
    activation_scratch_.resize(act_row_bytes * n_tokens);
    uint8_t* acts = activation_scratch_.data();
    pool_.parallel_for(n_tokens, 1, [&](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) {
        quant::quantize_activation_row(act_type, x + t * cols, acts + t * act_row_bytes, cols);
      }
    });
    for (int i = first; i < n_products; ++i) {
      if (activation_of(i) == act_type) {
        matmul_converted(*products[i].weight, acts, act_row_bytes, n_tokens, products[i].y);
      }
    }
  }
}

void CpuOps::matmul_converted(const Weight& w, const uint8_t* acts, size_t act_row_bytes,
                              int n_tokens, float* y) {
  if (w.interleaved != nullptr) {
    matmul_interleaved(w, acts, act_row_bytes, n_tokens, y);
    return;
  }
  const int64_t cols = w.cols();
  if (n_tokens >= kMinTileTokens) {
    const quant::FloatTileKernels* tiles = quant::float_tile_kernels(w.type, isa_, cols);
    if (tiles != nullptr) {
      matmul_tiled(w, *tiles, acts, act_row_bytes, n_tokens, y);
      return;
    }
  }
  const int64_t rows = w.rows();
  const quant::VecDotMultiFn dot = quant::vec_dot_multi_fn(w.type, isa_);
  // A batch is cut into groups of tokens whose converted activations stay in L1 (a multiple of
  // 8, what the fused kernels take at once; 8 where even those do not fit) and tiles of rows
  // whose weights stay in L2 while every group passes over them: each weight block is unpacked
  // once per group, and the activations come from L1 rather than L2 (2048-wide Q4_K rows, one
  // core: about 125 GMAC/s, against 80 with all 64 tokens of a batch against each row in turn).
  constexpr int kMaxGroup = 64;
  constexpr size_t kGroupBytes = 40 * 1024;
  constexpr size_t kTileBytes = 128 * 1024;
  const int fit = static_cast<int>(std::min<size_t>(kGroupBytes / act_row_bytes, kMaxGroup));
  const int group = std::min(n_tokens, std::max(8, fit - fit % 8));
  const int64_t tile_rows = std::max<int64_t>(1, static_cast<int64_t>(kTileBytes / w.row_bytes));
  // One contiguous band of rows per thread: each thread then streams its own stretch of the
  // weights, which measured far faster than handing out small interleaved chunks (decode of a
  // Q4_K_M model on 2 cores: 84 tokens/s against 42 with 64 chunks).
  const int64_t threads = pool_.size();
  const int64_t grain = (rows + threads - 1) / threads;
  pool_.parallel_for(rows, grain, [&](int64_t begin, int64_t end, int) {
    float column[kMaxGroup];
    for (int64_t r0 = begin; r0 < end; r0 += tile_rows) {
      const int64_t r1 = std::min(end, r0 + tile_rows);
      for (int t0 = 0; t0 < n_tokens; t0 += group) {
        const int nt = std::min(group, n_tokens - t0);
        for (int64_t r = r0; r < r1; ++r) {
          dot(cols, w.row(r), acts + t0 * act_row_bytes, act_row_bytes, nt, column);
          for (int t = 0; t < nt; ++t) y[static_cast<int64_t>(t0 + t) * rows + r] = column[t];
        }
      }
    }
  });
}

void CpuOps::matmul_interleaved(const Weight& w, const uint8_t* acts, size_t act_row_bytes,
                                int n_tokens, float* y) {
  constexpr int kRows = quant::kInterleavedRows;
  constexpr int kTile = quant::kInterleavedTile;
  const quant::InterleavedDotFn dot = quant::interleaved_dot_fn(w.type, isa_);
  const int64_t cols = w.cols();
  const int64_t rows = w.rows();
  const size_t group_bytes = kRows * w.row_bytes;
  // Tokens are taken in chunks whose activations stay in L2 while every group of the thread's
  // band passes over them; within a chunk each group (a few KB) stays in L1 across its tiles.
  constexpr size_t kChunkBytes = 256 * 1024;
  const int fit = static_cast<int>(kChunkBytes / act_row_bytes);
  const int chunk = std::max(kTile, fit - fit % kTile);
  // One contiguous band of groups per thread, as in matmul.
  const int64_t n_groups = rows / kRows;
  const int64_t threads = pool_.size();
  const int64_t grain = (n_groups + threads - 1) / threads;
  pool_.parallel_for(n_groups, grain, [&](int64_t begin, int64_t end, int) {
    for (int t0 = 0; t0 < n_tokens; t0 += chunk) {
      const int t1 = std::min(n_tokens, t0 + chunk);
      for (int64_t g = begin; g < end; ++g) {
        for (int t = t0; t < t1; t += kTile) {
          dot(cols, w.interleaved + g * group_bytes, acts + t * act_row_bytes, act_row_bytes,
              std::min(kTile, t1 - t), y + t * rows + g * kRows, static_cast<size_t>(rows));
        }
      }
    }
  });
}

void CpuOps::get_rows(const Weight& table, const int32_t* ids, int n, float scale, float* out) {
  const int64_t cols = table.cols();
  pool_.parallel_for(n, 1, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      float* dst = out + i * cols;
      quant::dequantize_row(table.type, table.row(ids[i]), dst, cols);
      for (int64_t c = 0; c < cols; ++c) dst[c] *= scale;
    }
  });
}

void CpuOps::rms_norm(const float* x, const float* weight, int n_rows, int dim, float eps,
                      float* out) {
  pool_.parallel_for(n_rows, std::max<int64_t>(1, kElementGrain / dim),
                     [&](int64_t begin, int64_t end, int) {
                       for (int64_t r = begin; r < end; ++r) {
                         const float* src = x + r * dim;
                         float* dst = out + r * dim;
                         double sum = 0.0;
                         for (int i = 0; i < dim; ++i) sum += static_cast<double>(src[i]) * src[i];
                         const float inv = static_cast<float>(1.0 / std::sqrt(sum / dim + eps));
                         if (weight != nullptr) {
                           for (int i = 0; i < dim; ++i) dst[i] = src[i] * inv * weight[i];
                         } else {
                           for (int i = 0; i < dim; ++i) dst[i] = src[i] * inv;
                         }
                       }
                     });
}

void CpuOps::rope_neox(float* x, const int32_t* positions, int n_tokens, int n_head, int head_dim,
                       const Rope& rope) {
  const int n_rot = rope.n_rot;
  const int half = n_rot / 2;
  pool_.parallel_for(n_tokens, 1, [&](int64_t begin, int64_t end, int) {
    std::vector<float> cos_t(half), sin_t(half);
    for (int64_t t = begin; t < end; ++t) {
      const double pos = positions[t];
      for (int i = 0; i < half; ++i) {
        double freq = std::pow(static_cast<double>(rope.base), -2.0 * i / n_rot);
        if (rope.freq_factors != nullptr) freq /= rope.freq_factors[i];
        const double angle = pos * freq;
        cos_t[i] = static_cast<float>(std::cos(angle));
        sin_t[i] = static_cast<float>(std::sin(angle));
      }
      for (int h = 0; h < n_head; ++h) {
        float* v = x + (t * n_head + h) * static_cast<int64_t>(head_dim);
        for (int i = 0; i < half; ++i) {
          const float a = v[i];
          const float b = v[i + half];
          v[i] = a * cos_t[i] - b * sin_t[i];
          v[i + half] = b * cos_t[i] + a * sin_t[i];
        }
      }
    }
  });
}

void CpuOps::gelu_mul(const float* gate, int gate_stride, const float* up, int up_stride,
                      int n_rows, int n_cols, float* out) {
  pool_.parallel_for(n_rows, std::max<int64_t>(1, kElementGrain / n_cols),
                     [&](int64_t begin, int64_t end, int) {
                       for (int64_t r = begin; r < end; ++r) {
                         const float* g = gate + r * gate_stride;
                         const float* u = up + r * up_stride;
                         float* o = out + r * n_cols;
                         for (int c = 0; c < n_cols; ++c) o[c] = gelu_tanh(g[c]) * u[c];
                       }
                     });
}

void CpuOps::add(float* x, const float* y, size_t n) {
  pool_.parallel_for(static_cast<int64_t>(n), kElementGrain, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) x[i] += y[i];
  });
}

void CpuOps::scale(float* x, float s, size_t n) {
  pool_.parallel_for(static_cast<int64_t>(n), kElementGrain, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) x[i] *= s;
  });
}

void CpuOps::softcap(float* x, float cap, size_t n) {
  pool_.parallel_for(static_cast<int64_t>(n), kElementGrain, [&](int64_t b, int64_t e, int) {
    for (int64_t i = b; i < e; ++i) x[i] = cap * fast_tanh(x[i] / cap);
  });
}

void CpuOps::copy(float* dst, const float* src, size_t n) {
  std::memcpy(dst, src, sizeof(float) * n);
}

void CpuOps::upload(void* dst, const void* host_src, size_t bytes) {
  std::memcpy(dst, host_src, bytes);
}

void CpuOps::read(const float* src, size_t n, float* host_dst) { copy(host_dst, src, n); }

void CpuOps::read_ids(const int32_t* src, size_t n, int32_t* host_dst) {
  std::memcpy(host_dst, src, sizeof(int32_t) * n);
}

void CpuOps::argmax(const float* x, int n_rows, int n_cols, int32_t* ids, float* logprobs) {
  for (int r = 0; r < n_rows; ++r) {
    const float* row = x + static_cast<int64_t>(r) * n_cols;
    const float* best = std::max_element(row, row + n_cols);
    double total = 0.0;
    for (int c = 0; c < n_cols; ++c) total += std::exp(static_cast<double>(row[c] - *best));
    ids[r] = static_cast<int32_t>(best - row);
    logprobs[r] = static_cast<float>(-std::log(total));
  }
}

void CpuOps::clustered_logits(const Weight& table, const float* x, int n, const float* scores,
                              int n_clusters, int top_k, const int32_t* clusters, int cluster_size,
                              float* logits) {
  const int64_t cols = table.cols();
  const int64_t vocab = table.rows();
  const quant::Type act_type = quant::type_info(table.type).activation;
  const size_t act_row_bytes = quant::row_bytes(act_type, cols);
  activation_scratch_.resize(act_row_bytes * n);
  uint8_t* acts = activation_scratch_.data();
  const int per_row = top_k * cluster_size;
  std::vector<int32_t> tokens;
  tokens.reserve(static_cast<size_t>(n) * per_row);
  for (int r = 0; r < n; ++r) {
    quant::quantize_activation_row(act_type, x + r * cols, acts + r * act_row_bytes, cols);
    const std::vector<int32_t> row = cluster_tokens(
        clusters, cluster_size,
        top_clusters(scores + static_cast<size_t>(r) * n_clusters, n_clusters, top_k));
    tokens.insert(tokens.end(), row.begin(), row.end());
  }
  std::vector<float> chosen(tokens.size());
  const quant::VecDotFn dot = quant::vec_dot_fn(table.type, isa_);
  constexpr int64_t kTokensPerChunk = 512;
  pool_.parallel_for(
      static_cast<int64_t>(tokens.size()), kTokensPerChunk, [&](int64_t begin, int64_t end, int) {
        for (int64_t j = begin; j < end; ++j) {
          chosen[j] = dot(cols, table.row(tokens[j]), acts + (j / per_row) * act_row_bytes);
        }
      });
  for (int r = 0; r < n; ++r) {
    const size_t first = static_cast<size_t>(r) * per_row;
    masked_row(tokens.data() + first, chosen.data() + first, per_row, vocab,
               logits + static_cast<size_t>(r) * vocab);
  }
}

void CpuOps::copy_rows(const float* src, const int32_t* rows, int n_rows, int dim, float* dst) {
  for (int i = 0; i < n_rows; ++i) {
    std::memcpy(dst + static_cast<int64_t>(i) * dim, src + static_cast<int64_t>(rows[i]) * dim,
                sizeof(float) * dim);
  }
}

void CpuOps::write_kv(const float* k, const float* v, const TokenBatch& batch, int layer,
                      KvPool& pool) {
  const int row = pool.row_elements(layer);
  for (int i = 0; i < batch.n; ++i) {
    const int seq = batch.seqs[i];
    const size_t offset =
        pool.row_offset(layer, batch.table(seq), batch.ring_sets[seq], batch.positions[i]);
    quant::quantize_activation_row(pool.kv_type(), k + static_cast<size_t>(i) * row,
                                   pool.keys(layer) + offset, row);
    quant::quantize_activation_row(pool.kv_type(), v + static_cast<size_t>(i) * row,
                                   pool.values(layer) + offset, row);
  }
}

void CpuOps::attention(const float* q, const TokenBatch& batch, const LayerConfig& layer,
                       int window, const KvPool& pool, float* out) {
  const int n_head = layer.n_head;
  const int head_dim = layer.head_dim;
  const int group = n_head / layer.n_head_kv;
  const int kv_layer = layer.kv_source;
  const uint8_t* keys = pool.keys(kv_layer);
  const uint8_t* values = pool.values(kv_layer);
  const quant::Type kv_type = pool.kv_type();
  const bool f32_entries = kv_type == quant::Type::F32;
  // A head's entries start at a whole block (head_dim is a multiple of the block size).
  const size_t head_bytes = quant::row_bytes(kv_type, head_dim);
  int max_span = 1;
  for (int i = 0; i < batch.n; ++i) {
    const AttendedRange range = attended_range(batch, i, window);
    max_span = std::max(max_span, range.last - range.first + 1);
  }
  // The SIMD float dots of the quant layer, one K row against the queries of every head that
  // reads it at once (a plain loop would stay scalar: a float sum may not be reordered; each
  // query's sum is the single dot's, whatever the number of heads).
  const quant::VecDotMultiFn dot_heads = quant::vec_dot_multi_fn(quant::Type::F32, isa_);
  // Per thread: the scores of the group's heads, one K row's dots and each head's 1 / sum of
  // its weights, then one K or V row converted to float (other entry types than F32 are
  // converted as they are read).
  const size_t per_thread = static_cast<size_t>(group) * (max_span + 2) + head_dim;
  attention_scratch_.resize(static_cast<size_t>(pool_.size()) * per_thread);
  // One task per token and KV head: every K and V row is read (and converted) once for the
  // `group` heads that share it.
  pool_.parallel_for(
      static_cast<int64_t>(batch.n) * layer.n_head_kv, 1,
      [&](int64_t begin, int64_t end, int thread) {
        float* scores = attention_scratch_.data() + static_cast<size_t>(thread) * per_thread;
        float* row_scores = scores + static_cast<size_t>(group) * max_span;
        float* inverse_sums = row_scores + group;
        float* converted = inverse_sums + group;
        const auto head_row = [&](const uint8_t* entries) {
          if (f32_entries) return reinterpret_cast<const float*>(entries);
          quant::dequantize_row(kv_type, entries, converted, head_dim);
          return static_cast<const float*>(converted);
        };
        for (int64_t task = begin; task < end; ++task) {
          const int i = static_cast<int>(task / layer.n_head_kv);
          const int kv_head = static_cast<int>(task % layer.n_head_kv);
          const int seq = batch.seqs[i];
          const int32_t* table = batch.table(seq);
          const int ring_set = batch.ring_sets[seq];
          const AttendedRange range = attended_range(batch, i, window);
          const int first = range.first, last = range.last, span = last - first + 1;
          const size_t kv_offset = kv_head * head_bytes;
          const int64_t head0 = static_cast<int64_t>(i) * n_head + kv_head * group;
          pool.for_each_row(kv_layer, table, ring_set, first, last, [&](int p, size_t row) {
            dot_heads(head_dim, head_row(keys + row + kv_offset), q + head0 * head_dim,
                      head_dim * sizeof(float), group, row_scores);
            for (int g = 0; g < group; ++g) scores[g * span + p - first] = row_scores[g];
          });
          for (int g = 0; g < group; ++g) {
            float* head_scores = scores + g * span;
            float max_score = -std::numeric_limits<float>::infinity();
            for (int p = 0; p < span; ++p) max_score = std::max(max_score, head_scores[p]);
            double total = 0.0;
            for (int p = 0; p < span; ++p) {
              const float e = std::exp(head_scores[p] - max_score);
              head_scores[p] = e;
              total += e;
            }
            inverse_sums[g] = static_cast<float>(1.0 / total);
          }
          float* o = out + head0 * head_dim;
          std::fill(o, o + static_cast<int64_t>(group) * head_dim, 0.0f);
          pool.for_each_row(kv_layer, table, ring_set, first, last, [&](int p, size_t row) {
            const float* vp = head_row(values + row + kv_offset);
            for (int g = 0; g < group; ++g) {
              const float weight = scores[g * span + p - first] * inverse_sums[g];
              float* oh = o + static_cast<int64_t>(g) * head_dim;
              for (int d = 0; d < head_dim; ++d) oh[d] += weight * vp[d];
            }
          });
        }
      });
}

void CpuOps::moe_route(const float* logits, int n_tokens, int n_expert, int k, int32_t* expert_ids,
                       float* expert_weights) {
  std::vector<float> probs(n_expert);
  std::vector<int32_t> order(n_expert);
  for (int t = 0; t < n_tokens; ++t) {
    const float* l = logits + static_cast<int64_t>(t) * n_expert;
    const float max_logit = *std::max_element(l, l + n_expert);
    double total = 0.0;
    for (int e = 0; e < n_expert; ++e) {
      probs[e] = std::exp(l[e] - max_logit);
      total += probs[e];
    }
    for (int e = 0; e < n_expert; ++e) probs[e] = static_cast<float>(probs[e] / total);
    for (int e = 0; e < n_expert; ++e) order[e] = e;
    std::partial_sort(order.begin(), order.begin() + k, order.end(), [&](int32_t a, int32_t b) {
      return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
    });
    double chosen = 0.0;
    for (int j = 0; j < k; ++j) chosen += probs[order[j]];
    for (int j = 0; j < k; ++j) {
      expert_ids[t * k + j] = order[j];
      expert_weights[t * k + j] = static_cast<float>(probs[order[j]] / chosen);
    }
  }
}

void CpuOps::moe_experts(const Weight& gate_up, const Weight& down, const float* down_scale,
                         const float* x, const int32_t* expert_ids, const float* expert_weights,
                         int n_tokens, int k, float* out) {
  const int64_t n_embd = gate_up.cols();
  const int64_t n_ff = gate_up.rows() / 2;
  const int64_t n_expert = gate_up.ne[2];
  std::fill(out, out + n_tokens * n_embd, 0.0f);
  std::vector<int32_t> tokens;
  std::vector<float> weights;
  std::vector<float> inputs, hidden, activated, outputs;
  // Tokens are grouped by expert so each expert's weights are read once per step.
  for (int64_t e = 0; e < n_expert; ++e) {
    tokens.clear();
    weights.clear();
    for (int t = 0; t < n_tokens; ++t) {
      for (int j = 0; j < k; ++j) {
        if (expert_ids[t * k + j] == e) {
          tokens.push_back(t);
          weights.push_back(expert_weights[t * k + j] * down_scale[e]);
        }
      }
    }
    const int m = static_cast<int>(tokens.size());
    if (m == 0) continue;
    inputs.resize(m * n_embd);
    copy_rows(x, tokens.data(), m, static_cast<int>(n_embd), inputs.data());
    hidden.resize(m * 2 * n_ff);
    matmul(gate_up.matrix(e), inputs.data(), m, hidden.data());
    activated.resize(m * n_ff);
    gelu_mul(hidden.data(), static_cast<int>(2 * n_ff), hidden.data() + n_ff,
             static_cast<int>(2 * n_ff), m, static_cast<int>(n_ff), activated.data());
    outputs.resize(m * n_embd);
    matmul(down.matrix(e), activated.data(), m, outputs.data());
    for (int j = 0; j < m; ++j) {
      float* o = out + tokens[j] * n_embd;
      const float* y = outputs.data() + j * n_embd;
      for (int64_t c = 0; c < n_embd; ++c) o[c] += weights[j] * y[c];
    }
  }
}

}  // namespace pg4
