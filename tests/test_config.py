"""Model configuration from GGUF metadata: the reference fixtures, and the defaults for keys a
file may leave out."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import GGUFLayout, rename, require_fixtures, rewrite_gguf

from pygemma4.config import LayerConfig, ModelConfig, model_config, open_model
from pygemma4.errors import UnsupportedModelError
from pygemma4.gguf_file import read_gguf

E_TYPES = ("f32", "Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q4_0")
MOE_TYPES = ("Q8_0", "Q4_K_M")
RMS_EPS_F32 = 9.999999974752427e-07  # 1e-6 as stored in a float32


def layer(index: int, is_sliding: bool, **changes: object) -> LayerConfig:
    """A layer of the E fixture, with `changes` applied."""
    fields: dict[str, object] = {
        "index": index,
        "is_sliding": is_sliding,
        "n_head": 4,
        "n_head_kv": 2,
        "head_dim": 32 if is_sliding else 64,
        "n_rot": 32 if is_sliding else 64,
        "rope_base": 10_000.0 if is_sliding else 1_000_000.0,
        "n_ff": 512,
        "has_kv": True,
        "kv_source": index,
        "has_v_proj": True,
        "is_moe": False,
    }
    fields.update(changes)
    return LayerConfig(**fields)  # type: ignore[arg-type]


E_SLIDING = (True, True, True, True, True, False, True, False)
E_CONFIG = ModelConfig(
    n_layer=8,
    n_embd=256,
    vocab_size=700,
    n_ctx_train=4096,
    rms_eps=RMS_EPS_F32,
    final_logit_softcap=30.0,
    sliding_window=16,
    n_embd_per_layer=16,
    n_expert=0,
    n_expert_used=0,
    n_ff_expert=0,
    has_output=False,
    layers=tuple(
        layer(i, s)
        if i < 6
        else layer(i, s, has_kv=False, kv_source=4 if s else 5, has_v_proj=False)
        for i, s in enumerate(E_SLIDING)
    ),
)
MOE_CONFIG = ModelConfig(
    n_layer=6,
    n_embd=256,
    vocab_size=800,
    n_ctx_train=4096,
    rms_eps=RMS_EPS_F32,
    final_logit_softcap=30.0,
    sliding_window=16,
    n_embd_per_layer=0,
    n_expert=4,
    n_expert_used=2,
    n_ff_expert=256,
    has_output=False,
    layers=tuple(
        [layer(i, True, head_dim=64, n_rot=64, is_moe=True) for i in range(5)]
        + [
            layer(
                5,
                False,
                n_head_kv=1,
                head_dim=128,
                n_rot=128,
                has_v_proj=False,
                is_moe=True,
            )
        ]
    ),
)


@pytest.mark.parametrize("qtype", E_TYPES)
def test_e_fixture(qtype: str) -> None:
    model = open_model(require_fixtures() / "gemma4-tiny-e" / f"model-{qtype}.gguf")
    assert model.config == E_CONFIG
    # layers 6 and 7 (sliding, full) read the caches of layers 4 and 5
    assert [layer.kv_source for layer in model.config.layers] == [0, 1, 2, 3, 4, 5, 4, 5]


@pytest.mark.parametrize("qtype", MOE_TYPES)
def test_moe_fixture(qtype: str) -> None:
    model = open_model(require_fixtures() / "gemma4-tiny-moe" / f"model-{qtype}.gguf")
    assert model.config == MOE_CONFIG
    assert [layer.n_head_kv for layer in model.config.layers] == [2, 2, 2, 2, 2, 1]
    assert not model.config.layers[5].has_v_proj


def test_model_config_of_read_file_matches_open_model(demo_model_file: Path) -> None:
    assert model_config(read_gguf(demo_model_file)) == open_model(demo_model_file).config


def without_key(tmp_path: Path, base: Path, key: str) -> Path:
    """A copy of `base` in which `key` is renamed to an unknown key of the same length."""
    data = rename(bytearray(base.read_bytes()), GGUFLayout(base).key(key), key, key[:-1] + "~")
    path = tmp_path / "model.gguf"
    path.write_bytes(data)
    return path


def test_absent_softcap_means_none(tmp_path: Path, demo_model_file: Path) -> None:
    path = without_key(tmp_path, demo_model_file, "gemma4.final_logit_softcapping")
    assert open_model(path).config.final_logit_softcap == 0.0


def test_absent_swa_rope_base_defaults_to_full_one(tmp_path: Path, demo_model_file: Path) -> None:
    path = without_key(tmp_path, demo_model_file, "gemma4.rope.freq_base_swa")
    assert {layer.rope_base for layer in open_model(path).config.layers} == {1_000_000.0}


def test_absent_swa_rope_dims_default_to_full_ones(tmp_path: Path, demo_model_file: Path) -> None:
    # llama.cpp's default (the full layers' 64) exceeds the sliding layers' head size of 32
    path = without_key(tmp_path, demo_model_file, "gemma4.rope.dimension_count_swa")
    with pytest.raises(UnsupportedModelError, match="rope.dimension_count_swa is 64"):
        open_model(path)


def test_absent_shared_kv_layers_means_every_layer_has_kv(
    tmp_path: Path, demo_model_file: Path
) -> None:
    path = without_key(tmp_path, demo_model_file, "gemma4.attention.shared_kv_layers")
    with pytest.raises(UnsupportedModelError, match="missing tensors 'blk.6.attn_k.weight'"):
        open_model(path)


def test_absent_kv_head_count_defaults_to_head_count(tmp_path: Path, demo_model_file: Path) -> None:
    path = without_key(tmp_path, demo_model_file, "gemma4.attention.head_count_kv")
    with pytest.raises(
        UnsupportedModelError,
        match=r"tensor 'blk.0.attn_k.weight' has shape \[256, 64\], but the metadata implies "
        r"\[256, 128\]",
    ):
        open_model(path)


def test_absent_per_layer_embedding_length_means_no_ple(
    tmp_path: Path, demo_model_file: Path
) -> None:
    path = without_key(tmp_path, demo_model_file, "gemma4.embedding_length_per_layer_input")
    with pytest.raises(
        UnsupportedModelError,
        match="unexpected tensors 'per_layer_token_embd.weight', 'per_layer_model_proj",
    ):
        open_model(path)


def test_absent_required_key(tmp_path: Path, demo_model_file: Path) -> None:
    path = without_key(tmp_path, demo_model_file, "gemma4.attention.key_length_swa")
    with pytest.raises(
        UnsupportedModelError,
        match="required metadata key 'gemma4.attention.key_length_swa' is missing",
    ):
        open_model(path)


def test_absent_architecture(tmp_path: Path, demo_model_file: Path) -> None:
    path = without_key(tmp_path, demo_model_file, "general.architecture")
    with pytest.raises(UnsupportedModelError, match="general.architecture is missing"):
        open_model(path)


@pytest.mark.parametrize("key", ["gemma4.context_length", "gemma4.attention.sliding_window"])
def test_a_value_past_the_cores_int_is_refused(
    tmp_path: Path, demo_model_file: Path, key: str
) -> None:
    # Found by fuzzing (tests/fuzz/corpus/gguf/regression-huge-context-length): the core's
    # binding could not hold it and failed with pybind11's bare RuntimeError.
    path = rewrite_gguf(demo_model_file, tmp_path / "model.gguf", {key: 2**32 - 1})
    with pytest.raises(
        UnsupportedModelError,
        match=f"metadata key '{key}' is 4294967295, more than the largest the core takes",
    ):
        open_model(path)
