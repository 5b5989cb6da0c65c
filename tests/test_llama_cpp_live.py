"""Whole-model parity with llama.cpp, run live, on the tensor types the fixtures do not ship.

The fixture's f32 model is quantized by llama.cpp's own quantizer (through llama-cpp-python)
into every remaining standard type; llama.cpp and pygemma4 then run the same file: top-1 must
agree at every position and the 24 greedy tokens must be identical.
"""

from __future__ import annotations

import ctypes

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType

from pygemma4 import Engine, open_model

# llama.cpp file types, each with the tensor type its mix must contain.
FILE_TYPES = {
    "Q4_1": GGMLQuantizationType.Q4_1,
    "Q5_1": GGMLQuantizationType.Q5_1,
    "Q5_0": GGMLQuantizationType.Q5_0,
    "Q2_K": GGMLQuantizationType.Q2_K,
    "Q3_K_M": GGMLQuantizationType.Q3_K,
    "Q4_K_S": GGMLQuantizationType.Q4_K,
    "BF16": GGMLQuantizationType.BF16,
    "F16": GGMLQuantizationType.F16,
}
N_GREEDY = 24


@pytest.fixture(scope="module")
def quantized_models(fixtures_dir, tmp_path_factory):
    source = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
    out = tmp_path_factory.mktemp("quantized")
    paths = {}
    for name in FILE_TYPES:
        params = llama_cpp.llama_model_quantize_default_params()
        params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
        params.nthread = 2
        path = out / f"model-{name}.gguf"
        rc = llama_cpp.llama_model_quantize(
            str(source).encode(), str(path).encode(), ctypes.byref(params)
        )
        assert rc == 0, f"llama.cpp failed to quantize to {name}"
        types = {t.type_id for t in open_model(path).gguf.tensors.values()}
        assert int(FILE_TYPES[name]) in types, f"{name} file lacks {FILE_TYPES[name].name}"
        paths[name] = path
    return paths


def llama_cpp_greedy(model: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


@pytest.mark.parametrize("file_type", list(FILE_TYPES))
def test_matches_llama_cpp_live(fixtures_dir, quantized_models, parity_report, file_type):
    path = quantized_models[file_type]
    engine = Engine(path, threads=2)
    llama = llama_cpp.Llama(
        str(path), n_ctx=512, logits_all=True, flash_attn=True, n_threads=2, verbose=False
    )
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    worst = 0.0
    for i in range(3):
        ids = ref[f"ids{i}"].tolist()
        llama.reset()
        llama.eval(ids)
        expected = np.array(llama.scores[: len(ids)])
        logits = engine.forward(ids)
        worst = max(worst, float(np.abs(logits - expected).max()))
        np.testing.assert_array_equal(
            logits.argmax(-1), expected.argmax(-1), err_msg=f"top-1 differs on prompt {i}"
        )
        assert engine.generate(ids, N_GREEDY) == llama_cpp_greedy(llama, ids, N_GREEDY)
    parity_report(f"gemma4-tiny-e {file_type} vs llama.cpp (live)", worst)
