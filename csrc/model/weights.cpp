#include "model/weights.h"

#include <algorithm>
#include <stdexcept>

#include "quant/types.h"

namespace pg4 {

WeightTable::WeightTable(const std::string& path, const std::vector<TensorEntry>& tensors)
    : file_(path) {
  for (const TensorEntry& t : tensors) {
    auto error = [&](const std::string& what) {
      return std::invalid_argument("tensor '" + t.name + "' " + what);
    };
    if (!quant::is_known_type(t.type_id)) throw error("has unknown type");
    if (t.shape.empty() || t.shape.size() > 4) throw error("bad rank");
    Weight w;
    w.type = static_cast<quant::Type>(t.type_id);
    uint64_t rows = 1;
    for (size_t i = 0; i < t.shape.size(); ++i) {
      if (t.shape[i] < 1) throw error("has an empty dimension");
      w.ne[i] = t.shape[i];
      if (i > 0) rows *= static_cast<uint64_t>(t.shape[i]);
    }
    if (w.ne[0] % quant::type_info(w.type).block_size != 0) {
      throw error("row length is not a multiple of its block size");
    }
    w.row_bytes = quant::row_bytes(w.type, w.ne[0]);
    if (t.offset > file_.size() || t.nbytes > file_.size() - t.offset ||
        rows * w.row_bytes != t.nbytes) {
      throw error("does not fit the file");
    }
    w.data = file_.data() + t.offset;
    weights_[t.name] = w;
  }
}

float WeightTable::scalar(const std::string& name) const { return get(name).f32()[0]; }

void WeightTable::place(Ops& ops, const std::string& host_resident) {
  std::vector<WeightPlacement> placements;
  for (auto& [name, w] : weights_) placements.push_back({&w, name == host_resident});
  ops.place_weights(placements, &file_);
}

Weight WeightTable::get(const std::string& name, bool required) const {
  auto it = weights_.find(name);
  if (it == weights_.end()) {
    if (required) throw std::invalid_argument("model file lacks tensor '" + name + "'");
    return Weight{};
  }
  return it->second;
}

int64_t WeightTable::max_cols() const {
  int64_t cols = 1;
  for (const auto& [name, w] : weights_) cols = std::max(cols, w.cols());
  return cols;
}

}  // namespace pg4
