"""Whole-model numbers against the outside references in ../shared/fixtures.

f32 GGUF vs Hugging Face fp32 logits (the 12B-style unified fixture's against transformers run
live); every quantized GGUF vs llama.cpp on the same file; f32 KV entries (test_kv_dtype
measures the other KV types). Each
runs on every CPU kernel set the build has (PYGEMMA4_CPU_KERNELS), the scalar fallback included.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from pygemma4 import Engine, _core

E_TYPES = ["f32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0"]
MOE_TYPES = ["Q8_0", "Q4_K_M"]
HF_TOLERANCE = 0.005
N_PROMPTS = 3
N_GREEDY = 24

ISAS = _core.cpu_isas()

_engines: dict[tuple[str, str, str], Engine] = {}


def engine_for(fixtures_dir, model: str, qtype: str, isa: str) -> Engine:
    """The engine of a fixture file computing with the kernels of `isa`."""
    key = (model, qtype, isa)
    if key not in _engines:
        saved = os.environ.get("PYGEMMA4_CPU_KERNELS")
        os.environ["PYGEMMA4_CPU_KERNELS"] = isa
        try:
            _engines[key] = Engine(
                fixtures_dir / model / f"model-{qtype}.gguf", threads=2, kv_dtype="f32"
            )
        finally:
            if saved is None:
                del os.environ["PYGEMMA4_CPU_KERNELS"]
            else:
                os.environ["PYGEMMA4_CPU_KERNELS"] = saved
    return _engines[key]


@pytest.mark.parametrize("isa", ISAS)
def test_f32_matches_huggingface(fixtures_dir, parity_report, isa):
    engine = engine_for(fixtures_dir, "gemma4-tiny-e", "f32", isa)
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    worst = 0.0
    for i in range(N_PROMPTS):
        expected = ref[f"logits{i}"]
        logits = engine.forward(ref[f"ids{i}"])
        assert logits.shape == expected.shape
        delta = float(np.abs(logits - expected).max())
        worst = max(worst, delta)
        assert delta <= HF_TOLERANCE, f"prompt {i}: max |dlogit| {delta} vs Hugging Face"
        np.testing.assert_array_equal(logits.argmax(-1), expected.argmax(-1))
    parity_report(f"gemma4-tiny-e f32 vs Hugging Face ({isa})", worst)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize(
    ("model", "qtype"),
    [("gemma4-tiny-e", t) for t in E_TYPES] + [("gemma4-tiny-moe", t) for t in MOE_TYPES],
)
def test_matches_llama_cpp(fixtures_dir, parity_report, model, qtype, isa):
    engine = engine_for(fixtures_dir, model, qtype, isa)
    ref = np.load(fixtures_dir / model / "ref.npz")
    llama = np.load(fixtures_dir / model / "llama_ref.npz")
    worst = 0.0
    for i in range(N_PROMPTS):
        ids = ref[f"ids{i}"]
        expected = llama[f"{qtype}/logits{i}"]
        logits = engine.forward(ids)
        worst = max(worst, float(np.abs(logits - expected).max()))
        np.testing.assert_array_equal(
            logits.argmax(-1), expected.argmax(-1), err_msg=f"top-1 differs on prompt {i}"
        )
        greedy = engine.generate(ids, N_GREEDY, stop_tokens=())
        assert greedy == llama[f"{qtype}/greedy{i}"].tolist(), f"greedy differs on prompt {i}"
    parity_report(f"{model} {qtype} vs llama.cpp ({isa})", worst)


UNIFIED = "gemma4-tiny-unified"
# The unified fixture's stored logits were computed where transformers' float32 arithmetic
# strays from what it gives here: transformers 5.24 on torch 2.13 (CPU) itself sits 0.011 to
# 0.033 from them on the fixture's own checkpoint, and this engine within 3e-5 of it. So the
# f32 file is held to transformers run live, and to the stored references by their greedy
# continuations (identical) and that measured distance.
UNIFIED_STORED_TOLERANCE = 0.05


@pytest.fixture(scope="module")
def unified_live_logits(fixtures_dir) -> list[np.ndarray]:
    """transformers' float32 logits of the unified fixture's checkpoint, run live on the CPU
    for each stored prompt."""
    torch = pytest.importorskip("torch", reason="torch (CPU) runs transformers live")
    transformers = pytest.importorskip("transformers")
    ref = np.load(fixtures_dir / UNIFIED / "ref_unified.npz")
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        fixtures_dir / UNIFIED / "hf", dtype=torch.float32
    ).eval()
    with torch.no_grad():
        return [
            model(input_ids=torch.tensor(ref[f"p{i}/ids"], dtype=torch.long)[None])
            .logits[0]
            .numpy()
            for i in range(N_PROMPTS)
        ]


@pytest.mark.parametrize("isa", ISAS)
def test_unified_f32_matches_huggingface(fixtures_dir, parity_report, unified_live_logits, isa):
    """The 12B-style text model (no per-layer embeddings, KV shared across layer kinds)."""
    engine = engine_for(fixtures_dir, UNIFIED, "f32", isa)
    ref = np.load(fixtures_dir / UNIFIED / "ref_unified.npz")
    worst = 0.0
    for i in range(N_PROMPTS):
        ids = ref[f"p{i}/ids"]
        logits = engine.forward(ids)
        assert logits.shape == unified_live_logits[i].shape
        delta = float(np.abs(logits - unified_live_logits[i]).max())
        worst = max(worst, delta)
        assert delta <= HF_TOLERANCE, f"prompt {i}: max |dlogit| {delta} vs transformers live"
        stored = float(np.abs(logits - ref[f"p{i}/logits"]).max())
        assert stored <= UNIFIED_STORED_TOLERANCE, f"prompt {i}: {stored} from the stored logits"
        greedy = engine.generate(ids, N_GREEDY, stop_tokens=())
        assert greedy == ref[f"p{i}/greedy"].tolist(), f"greedy differs on prompt {i}"
    parity_report(f"{UNIFIED} f32 vs transformers live ({isa})", worst)
