"""Whole-model parity with llama.cpp, run live, on the tensor types the fixtures do not ship.

llama.cpp's own quantizer (through llama-cpp-python) turns the fixtures into every remaining
standard type: the E model from its f32 file, the MoE model from its Q8_0 file (the only one
it has, so requantized). llama.cpp and pygemma4 then run the same file: top-1 must agree at
every position and the 24 greedy tokens must be identical.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import llama_cpp
import numpy as np
import pytest
from gguf import GGMLQuantizationType as T

from pygemma4 import Engine, open_model

# (fixture, source file, llama.cpp file type, a tensor type the resulting mix must contain)
CASES = [
    ("gemma4-tiny-e", "f32", "Q4_1", T.Q4_1),
    ("gemma4-tiny-e", "f32", "Q5_1", T.Q5_1),
    ("gemma4-tiny-e", "f32", "Q5_0", T.Q5_0),
    ("gemma4-tiny-e", "f32", "Q2_K", T.Q2_K),
    ("gemma4-tiny-e", "f32", "Q3_K_M", T.Q3_K),
    ("gemma4-tiny-e", "f32", "Q4_K_S", T.Q4_K),
    ("gemma4-tiny-e", "f32", "BF16", T.BF16),
    ("gemma4-tiny-e", "f32", "F16", T.F16),
    ("gemma4-tiny-moe", "Q8_0", "Q4_0", T.Q4_0),
    ("gemma4-tiny-moe", "Q8_0", "Q4_1", T.Q4_1),
    ("gemma4-tiny-moe", "Q8_0", "Q2_K", T.Q2_K),
    ("gemma4-tiny-moe", "Q8_0", "Q5_K_M", T.Q5_K),
    ("gemma4-tiny-moe", "Q8_0", "Q6_K", T.Q6_K),
    ("gemma4-tiny-moe", "Q8_0", "BF16", T.BF16),
]
N_GREEDY = 24


def quantize(source: Path, out: Path, file_type: str, must_contain: T) -> None:
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{file_type}")
    params.nthread = 2
    params.allow_requantize = True
    rc = llama_cpp.llama_model_quantize(
        str(source).encode(), str(out).encode(), ctypes.byref(params)
    )
    assert rc == 0, f"llama.cpp failed to quantize {source.name} to {file_type}"
    types = {t.type_id for t in open_model(out).gguf.tensors.values()}
    assert int(must_contain) in types, f"{file_type} file lacks {must_contain.name}"


def llama_cpp_greedy(model: llama_cpp.Llama, ids: list[int], n: int) -> list[int]:
    model.reset()
    model.eval(ids)
    out = []
    for _ in range(n):
        token = int(np.argmax(model.scores[model.n_tokens - 1]))
        out.append(token)
        model.eval([token])
    return out


@pytest.mark.parametrize(
    ("fixture", "source", "file_type", "must_contain"),
    CASES,
    ids=[f"{fixture}-{file_type}" for fixture, _, file_type, _ in CASES],
)
def test_matches_llama_cpp_live(
    fixtures_dir, tmp_path, parity_report, fixture, source, file_type, must_contain
):
    path = tmp_path / f"model-{file_type}.gguf"
    quantize(fixtures_dir / fixture / f"model-{source}.gguf", path, file_type, must_contain)
    engine = Engine(path, threads=2)
    llama = llama_cpp.Llama(
        str(path), n_ctx=512, logits_all=True, flash_attn=True, n_threads=2, verbose=False
    )
    ref = np.load(fixtures_dir / fixture / "ref.npz")
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
        assert engine.generate(ids, N_GREEDY, stop_tokens=()) == llama_cpp_greedy(
            llama, ids, N_GREEDY
        )
    parity_report(f"{fixture} {file_type} vs llama.cpp (live)", worst)
