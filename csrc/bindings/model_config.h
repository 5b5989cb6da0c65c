// pygemma4.config.ModelConfig (any Python object with its fields) as the core's ModelConfig.
#pragma once

#include <pybind11/pybind11.h>

#include "model/config.h"

namespace pg4 {

ModelConfig to_model_config(const pybind11::object& config);

}  // namespace pg4
