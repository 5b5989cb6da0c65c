// A model file's tensors as Weights: the mapping of the file, each tensor checked against it, and
// the lookups the models build their layers from.
#pragma once

#include <cstdint>
#include <string>
#include <unordered_map>
#include <vector>

#include "common/weight.h"
#include "gguf/mapped_file.h"
#include "ops/ops.h"

namespace pg4 {

// Where one tensor lies in the file (already validated by the Python loader).
struct TensorEntry {
  std::string name;
  int type_id = 0;
  std::vector<int64_t> shape;  // GGUF order, innermost first
  uint64_t offset = 0;
  uint64_t nbytes = 0;
};

class WeightTable {
 public:
  // Maps the file and checks every entry against it (std::invalid_argument naming the tensor).
  WeightTable(const std::string& path, const std::vector<TensorEntry>& tensors);
  WeightTable(const WeightTable&) = delete;
  WeightTable& operator=(const WeightTable&) = delete;

  // The value of the one-element F32 tensor `name`, read while the weights are host memory.
  float scalar(const std::string& name) const;
  // Makes every weight readable where `ops` computes; `host_resident` names the tensors that
  // stay in host memory (see WeightPlacement).
  void place(Ops& ops, const std::string& host_resident = "");
  // The tensor `name`; an absent Weight when it is optional and missing.
  Weight get(const std::string& name, bool required = true) const;
  bool has(const std::string& name) const { return weights_.count(name) > 0; }
  // The widest row of any tensor: the longest matmul input.
  int64_t max_cols() const;

 private:
  MappedFile file_;
  std::unordered_map<std::string, Weight> weights_;
};

}  // namespace pg4
