"""The unified (12B-style) models' images: the `gemma4uv` block projector and its preprocessing
against transformers' references for the tiny unified fixture (its processor's pixel blocks to
the byte, the rows that replace the `<|image|>` tokens), torchvision's uint8 resize, and whole
chats with images and clips: the attention masks transformers used (image tokens attend to
each other in both directions), the logits of transformers' model run live, and the same
greedy tokens from the engine, `pygemma4 generate` and the server."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from serve_helpers import ServeProcess
from test_cli import run_cli
from test_serve_media import (
    MAX_IMAGE_TOKENS,
    assert_same_steps,
    audio_part,
    chat,
    cli_steps,
    engine_steps,
    image_part,
    media_serve_args,
    served_engine,
    zmq_steps,
)

from pygemma4 import Engine
from pygemma4.errors import MediaError, UnsupportedModelError
from pygemma4.media.audio import decode_wav
from pygemma4.media.image_blocks import ImageBlockEncoder
from pygemma4.media.kinds import PreparedMedia
from pygemma4.media.resize import resize_bicubic_uint8
from pygemma4.mmproj import MmprojMismatchError
from pygemma4.multimodal import Prompt
from pygemma4.runner import Feed, ForwardBatch, SpanSplitError

EMBEDDING_ATOL = 1e-5
LOGITS_ATOL = 5e-3
IMAGE_TOKEN, AUDIO_TOKEN = 11, 14


@pytest.fixture(scope="module")
def unified(fixtures_dir: Path) -> Path:
    return fixtures_dir / "gemma4-tiny-unified"


@pytest.fixture(scope="module")
def ref(unified: Path):
    return np.load(unified / "ref_unified.npz")


@pytest.fixture(scope="module")
def encoder(unified: Path) -> ImageBlockEncoder:
    return ImageBlockEncoder(unified / "mmproj-f32.gguf", max_image_tokens=70, threads=2)


@pytest.mark.parametrize("k", [0, 1])
def test_blocks_are_the_processors_pixels(encoder, unified, ref, k):
    image = encoder.prepare(unified / "inputs" / f"img{k}.png")
    height, width = ref[f"img{k}/resized_hw"]
    assert image.grid == (height // 24, width // 24)
    assert image.n_tokens == int(ref[f"img{k}/num_soft_tokens"])
    # The processor's rows are each 24×24 block in (row, column, channel) order; the
    # projector file's weights read (channel, row, column).
    u8 = ref[f"img{k}/pixel_values_u8"].reshape(-1, 24, 24, 3).transpose(0, 3, 1, 2)
    expected = u8.reshape(len(u8), -1).astype(np.float32) * np.float32(1 / 255)
    np.testing.assert_array_equal(image.features, expected)


@pytest.mark.parametrize("k", [0, 1])
def test_embeddings_equal_transformers(encoder, unified, ref, k):
    embeddings = encoder.embed(unified / "inputs" / f"img{k}.png").embeddings
    expected = ref[f"img{k}/embeddings"]
    assert embeddings.shape == expected.shape
    assert np.abs(embeddings - expected).max() < EMBEDDING_ATOL


@pytest.mark.parametrize(
    "source, target",
    [
        ((64, 48), (216, 168)),
        ((300, 200), (168, 120)),
        ((97, 513), (48, 240)),
        ((50, 60), (77, 33)),
        ((1000, 700), (240, 168)),
        ((3, 2000), (24, 1680)),
    ],
)
def test_resize_is_torchvisions_to_the_byte(source, target):
    torch = pytest.importorskip("torch", reason="torch computes the reference resize")
    image = np.random.default_rng(sum(source)).integers(0, 256, (*source, 3), dtype=np.uint8)
    theirs = (
        torch.nn.functional.interpolate(
            torch.from_numpy(image).permute(2, 0, 1)[None],
            size=target,
            mode="bicubic",
            antialias=True,
        )[0]
        .permute(1, 2, 0)
        .numpy()
    )
    np.testing.assert_array_equal(resize_bicubic_uint8(image, *target), theirs)


def test_the_encoder_tower_file_is_refused(fixtures_dir):
    with pytest.raises(UnsupportedModelError, match="gemma4v.*gemma4uv"):
        ImageBlockEncoder(fixtures_dir / "gemma4-tiny-mm" / "mmproj-f32.gguf")


def test_blocks_outside_the_position_tables_are_refused(unified):
    # A strip of 100×1 blocks resized within 280 soft tokens: 167 blocks wide, more than the
    # 72 positions the fixture's table holds per axis.
    encoder = ImageBlockEncoder(unified / "mmproj-f32.gguf", max_image_tokens=280, threads=2)
    strip = np.zeros((24, 24 * 100, 3), dtype=np.uint8)
    with pytest.raises(MediaError, match="1×167 blocks exceed the projector's position tables"):
        encoder.prepare(strip)


def test_a_block_grid_that_does_not_match_its_rows_is_refused(encoder, unified):
    image = encoder.prepare(unified / "inputs" / "img0.png")
    wrong = PreparedMedia(image.kind, image.features[:-1], image.n_tokens, image.digest, image.grid)
    with pytest.raises(MediaError, match="7×9 blocks"):
        encoder.encode(wrong)


@pytest.fixture(scope="module")
def engine(unified: Path) -> Engine:
    return Engine(
        unified / "model-f32.gguf",
        threads=2,
        kv_dtype="f32",
        mmproj=unified / "mmproj-f32.gguf",
        max_image_tokens=MAX_IMAGE_TOKENS,
    )


def fixture_chat(unified: Path, ref, name: str) -> list[dict[str, Any]]:
    """The reference chat `name` with its media paths made absolute."""
    text = json.dumps(json.loads(str(ref["chats"]))[name])
    return json.loads(text.replace('"inputs/', json.dumps(str(unified / "inputs") + "/")[:-1]))


def test_a_projector_for_another_width_is_refused_naming_both(unified, fixtures_dir):
    other = fixtures_dir / "gemma4-tiny-e" / "model-Q4_0.gguf"
    with pytest.raises(MmprojMismatchError, match="vision projection produces rows of 128") as e:
        Engine(other, threads=1, mmproj=unified / "mmproj-f32.gguf")
    assert str(other) in str(e.value) and "mmproj-f32.gguf" in str(e.value)


def test_inspect_describes_the_block_and_frame_projections(unified, tmp_path):
    result = run_cli("inspect", str(unified / "mmproj-f32.gguf"), "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["vision"] == {
        "block": 24,
        "width": 64,
        "n_pos": 72,
        "eps": pytest.approx(1e-6),
        "embedding_dim": 128,
    }
    assert info["audio"]["projector"] == "gemma4ua" and info["audio"]["feature_dim"] == 640


CHAT_NAMES = ["chat_image", "chat_audio", "chat_image_audio"]


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_chats_give_the_processors_tokens(engine, unified, ref, name):
    prompt = engine.prepare(fixture_chat(unified, ref, name))
    np.testing.assert_array_equal(prompt.token_ids, ref[f"{name}/input_ids"])
    # transformers' image blocks: the runs of image-typed positions.
    image = np.concatenate([[0], ref[f"{name}/mm_token_type_ids"] == 1, [0]]).astype(int)
    edges = np.flatnonzero(np.diff(image))
    blocks = list(zip(edges[::2].tolist(), edges[1::2].tolist(), strict=True))
    assert blocks == [(m.offset, m.offset + m.length) for m in prompt.media if m.bidirectional]


def our_mask(prompt: Prompt, window: int) -> np.ndarray:
    """[L, L] which key each query reads, by the rule the core applies (see Ops::attention):
    causal (within `window` when given), and all of its image for an image token."""
    n = len(prompt)
    q, k = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
    mask = k <= q
    if window:
        mask &= q - k < window
    for m in prompt.media:
        if m.bidirectional:
            inside = slice(m.offset, m.offset + m.length)
            mask[inside, inside] = True
    return mask


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_the_attention_rule_is_the_mask_transformers_used(engine, unified, ref, name):
    prompt = engine.prepare(fixture_chat(unified, ref, name))
    np.testing.assert_array_equal(our_mask(prompt, 0), ref[f"{name}/mask_full"].astype(bool))
    np.testing.assert_array_equal(our_mask(prompt, 16), ref[f"{name}/mask_sliding"].astype(bool))


def hf_logits(unified: Path, ref, name: str) -> np.ndarray:
    """transformers' logits of the reference chat, its model run here in fp32 on the
    processor's inputs (the pixel blocks and frames the fixture stores)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model = transformers.AutoModelForImageTextToText.from_pretrained(
        unified / "hf", dtype=torch.float32
    ).eval()
    media = json.loads(str(ref["chat_media"]))[name]
    images = [m for m in media if m.startswith("img")]
    clips = [m for m in media if m.startswith("aud")]
    inputs: dict[str, Any] = {}
    if images:
        pixels = np.zeros((len(images), 70, 1728), dtype=np.float32)
        for j, m in enumerate(images):
            u8 = ref[f"{m}/pixel_values_u8"]
            pixels[j, : len(u8)] = u8.astype(np.float32) * np.float32(1 / 255)
        positions = np.stack([ref[f"{m}/image_position_ids"] for m in images])
        inputs["pixel_values"] = torch.tensor(pixels)
        inputs["image_position_ids"] = torch.tensor(positions.astype(np.int64))
    if clips:
        extractor = transformers.AutoFeatureExtractor.from_pretrained(unified / "hf")
        samples = [decode_wav(unified / "inputs" / f"{c}.wav") for c in clips]
        inputs.update(extractor(samples, sampling_rate=16_000, return_tensors="pt"))
    ids = torch.tensor(ref[f"{name}/input_ids"].astype(np.int64))[None]
    types = torch.tensor(ref[f"{name}/mm_token_type_ids"].astype(np.int64))[None]
    with torch.no_grad():
        return model(input_ids=ids, mm_token_type_ids=types, **inputs).logits[0].numpy()


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_chat_logits_equal_transformers_run_live(engine, unified, ref, name, parity_report):
    """Every position within 5e-3 of transformers' and the same top-1. (Against the logits
    stored in ref_unified.npz the model run here differs by 0.2 to 1.2 itself, on the audio
    chat too, whose masks are plainly causal: so the reference is computed live, as
    test_multimodal_audio does; the stored masks pin the attention rule.)"""
    ours = engine.forward(engine.prepare(fixture_chat(unified, ref, name)))
    expected = hf_logits(unified, ref, name)
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))
    worst = float(np.abs(ours - expected).max())
    assert worst < LOGITS_ATOL
    parity_report(f"unified {name} vs transformers (live)", worst)


STORED_TOLERANCE = 1.5
"""How far the stored logits may be: transformers run here strays from them by 0.23 (audio),
0.53 (image) and 1.19 (image and audio) itself (on the text prompts by 0.011 to 0.033, see
test_parity)."""


@pytest.mark.parametrize("name", CHAT_NAMES)
def test_chats_keep_the_stored_references_next_token(engine, unified, ref, name):
    ours = engine.forward(engine.prepare(fixture_chat(unified, ref, name)))
    assert int(ours[-1].argmax()) == int(ref[f"{name}/greedy_next"])
    assert np.abs(ours - ref[f"{name}/logits"]).max() < STORED_TOLERANCE


def test_image_chats_attended_causally_would_be_far_off(engine, unified, ref):
    """The bidirectional rule matters: the same prompt with its image attended causally is
    off by far more than the tolerance (transformers' own causal fallback: ~6)."""
    prompt = engine.prepare(fixture_chat(unified, ref, "chat_image"))
    causal = Prompt(
        prompt.token_ids,
        tuple(dataclasses.replace(m, bidirectional=False) for m in prompt.media),
    )
    expected = hf_logits(unified, ref, "chat_image")
    assert np.abs(engine.forward(causal) - expected).max() > 1.0


def test_chunked_prefill_never_cuts_an_image(unified, ref):
    """With calls of 64 tokens the image (positions 6..68) is computed whole in the second
    call and the logits are those of one call; an image longer than a call is refused."""
    whole = Engine(unified / "model-f32.gguf", threads=2, kv_dtype="f32", n_batch=256)
    chunked = Engine(unified / "model-f32.gguf", threads=2, kv_dtype="f32", n_batch=64)
    engine = Engine(
        unified / "model-f32.gguf",
        threads=2,
        kv_dtype="f32",
        mmproj=unified / "mmproj-f32.gguf",
        max_image_tokens=70,
    )
    prompt = engine.prepare(fixture_chat(unified, ref, "chat_image"))
    expected = whole.forward(prompt)
    np.testing.assert_allclose(chunked.forward(prompt), expected, atol=1e-5)
    small = Engine(unified / "model-f32.gguf", threads=2, kv_dtype="f32", n_batch=32)
    with pytest.raises(SpanSplitError, match="longer than a call of n_batch 32"):
        small.forward(prompt)


def test_the_prefix_cache_never_resumes_inside_an_image(engine, unified, ref):
    """A prompt with the same tokens and image that goes on differently after the image: the
    blocks it shares end inside the image (positions 6..68, blocks of 16), so it reuses
    none of them (only blocks before the image could be), and gives a fresh engine's
    tokens."""
    prompt = engine.prepare(fixture_chat(unified, ref, "chat_image"))
    image = prompt.media[0]
    assert image.bidirectional and (image.offset, image.offset + image.length) == (6, 69)
    other = Prompt(
        np.concatenate([prompt.token_ids[:70], np.arange(100, 120, dtype=np.int32)]),
        prompt.media,
    )
    fresh = Engine(unified / "model-f32.gguf", threads=2, kv_dtype="f32")
    expected = fresh.generate(other, 3, stop_tokens=())
    engine.generate(prompt, 3, stop_tokens=())
    hits = engine.prefix_cache.stats.hit
    assert engine.generate(other, 3, stop_tokens=()) == expected
    assert engine.prefix_cache.stats.hit - hits == 0
    # The same prompt again reuses its blocks through the image and past it.
    hits = engine.prefix_cache.stats.hit
    engine.generate(other, 3, stop_tokens=())
    assert engine.prefix_cache.stats.hit - hits >= 80


def test_the_core_refuses_spans_that_leave_the_call_or_their_row(engine):
    """Spans are checked before anything is written: one reaching past the call's rows (keys
    not written yet) or one that does not hold its row's position is refused."""
    tokens = np.arange(2, 10, dtype=np.int32)
    with engine.new_sequence() as seq:
        seq.kv.ensure(len(tokens))
        batch = ForwardBatch.of([Feed(seq.kv, tokens)], False)
        at = batch.positions
        past = dataclasses.replace(batch, span_first=at.copy(), span_last=at + 8)
        with pytest.raises(ValueError, match="not wholly in the call"):
            engine.runner.model.forward(engine.runner.pool, past)
        elsewhere = dataclasses.replace(batch, span_first=at + 1, span_last=at + 1)
        with pytest.raises(ValueError, match="does not hold its position"):
            engine.runner.model.forward(engine.runner.pool, elsewhere)
        assert seq.length == 0


@pytest.fixture(scope="module")
def server(unified: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    model = unified / "model-f32.gguf"
    # Prefill chunks of 16 are raised to the 70 soft tokens an image may have: prompts are
    # prefilled in several calls, each image in one.
    args = (*media_serve_args(unified / "mmproj-f32.gguf"), "--prefill-chunk", "16")
    with ServeProcess.running(model, tmp_path_factory.mktemp("serve-unified"), *args) as serve:
        yield serve


UNIFIED_CHATS = {"image": (("img0",), ()), "image+audio": (("img1",), ("aud2",))}


@pytest.mark.parametrize("name", list(UNIFIED_CHATS))
def test_greedy_tokens_equal_across_engine_cli_and_server(name, server, unified, tmp_path):
    images, clips = UNIFIED_CHATS[name]
    inputs = unified / "inputs"
    messages = chat(
        *(image_part((inputs / f"{i}.png").read_bytes()) for i in images),
        *(audio_part((inputs / f"{c}.wav").read_bytes()) for c in clips),
    )
    engine = served_engine(unified)
    prompt = engine.prepare(messages)
    assert any(m.bidirectional for m in prompt.media)
    expected = engine_steps(engine, messages)
    prompt_tokens, steps = zmq_steps(server, messages)
    assert prompt_tokens == len(prompt)
    assert_same_steps(steps, expected)
    prompt_tokens, steps = cli_steps(unified, images, clips, tmp_path)
    assert prompt_tokens == len(prompt)
    assert_same_steps(steps, expected)
