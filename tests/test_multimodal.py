"""Images in chats end to end on the tiny multimodal fixture: `Engine.prepare` places the soft
tokens as transformers' processor does, whole-prompt logits equal transformers'
Gemma4ForConditionalGeneration run live (within 5e-3, the same top-1 at every position) for one
and two images, generation and chunked prefill agree with them, and the prefix cache never
shares KV between the same tokens with different images."""

from __future__ import annotations

import base64
from pathlib import Path

import numpy as np
import pytest

from pygemma4.engine import Engine
from pygemma4.errors import ChatTemplateError, MediaError
from pygemma4.multimodal import PlacedMedia, Prompt

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from PIL import Image  # noqa: E402
from transformers.models.gemma4.image_processing_pil_gemma4 import (  # noqa: E402
    Gemma4ImageProcessorPil,
)

LOGITS_ATOL = 5e-3
IMAGE_TOKEN = 11


def hf_logits(model, token_ids: np.ndarray, images: list[Path]) -> np.ndarray:
    processed = Gemma4ImageProcessorPil(max_soft_tokens=70)(
        images=[Image.open(p) for p in images], return_tensors="pt"
    )
    with torch.no_grad():
        out = model(
            input_ids=torch.tensor(token_ids, dtype=torch.long)[None],
            pixel_values=processed["pixel_values"],
            image_position_ids=processed["image_position_ids"],
            mm_token_type_ids=torch.tensor(token_ids == IMAGE_TOKEN, dtype=torch.long)[None],
        )
    return out.logits[0].numpy()


def chat(*parts: dict) -> list[dict]:
    return [{"role": "user", "content": list(parts)}]


def image(path: Path) -> dict:
    return {"type": "image", "image": str(path)}


TEXT = {"type": "text", "text": "Describe this image."}


def test_prepare_places_soft_tokens_as_the_processor_does(mm_engine, mm_dir):
    ref = np.load(mm_dir / "ref_mm.npz")
    prompt = mm_engine.prepare(chat(image(mm_dir / "inputs" / "img0.png"), TEXT))
    np.testing.assert_array_equal(prompt.token_ids, ref["chat_image/input_ids"])
    (media,) = prompt.media
    assert media.length == 63 and prompt.token_ids[media.offset - 1] == 9
    assert (prompt.token_ids[media.offset : media.offset + 63] == IMAGE_TOKEN).all()
    assert prompt.token_ids[media.offset + 63] == 10


def test_every_image_part_form_gives_the_same_prompt(mm_engine, mm_dir):
    path = mm_dir / "inputs" / "img0.png"
    expected = mm_engine.prepare(chat(image(path), TEXT))
    uri = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    forms = [
        {"type": "image", "url": str(path)},
        {"type": "image", "image": path.read_bytes()},
        {"type": "image", "image": Image.open(path)},
        {"type": "image", "image": np.asarray(Image.open(path).convert("RGB"))},
        {"type": "image_url", "image_url": {"url": uri}},
    ]
    for part in forms:
        prompt = mm_engine.prepare(chat(part, TEXT))
        np.testing.assert_array_equal(prompt.token_ids, expected.token_ids)
        np.testing.assert_array_equal(prompt.media[0].embeddings, expected.media[0].embeddings)


@pytest.mark.parametrize("images", [["img0"], ["img1", "img0"]])
def test_logits_equal_transformers_run_live(mm_engine, hf_mm_model, mm_dir, images, parity_report):
    paths = [mm_dir / "inputs" / f"{name}.png" for name in images]
    prompt = mm_engine.prepare(chat(*(image(p) for p in paths), TEXT))
    assert len(prompt.media) == len(images)
    ours = mm_engine.forward(prompt)
    expected = hf_logits(hf_mm_model, prompt.token_ids, paths)
    worst = float(np.abs(ours - expected).max())
    assert worst < LOGITS_ATOL
    np.testing.assert_array_equal(ours.argmax(-1), expected.argmax(-1))
    parity_report(f"chat with {len(images)} image(s) vs transformers (live)", worst)


def test_chunked_prefill_and_generation_agree_with_the_whole_prompt(mm_engine, mm_dir):
    prompt = mm_engine.prepare(chat(image(mm_dir / "inputs" / "img1.png"), TEXT))
    whole = mm_engine.forward(prompt)
    chunked = Engine(
        mm_dir / "model-f32.gguf",
        threads=2,
        n_batch=16,
        kv_dtype="f32",
        mmproj=mm_dir / "mmproj-f32.gguf",
        max_image_tokens=70,
    )
    np.testing.assert_allclose(chunked.forward(prompt), whole, atol=1e-4)
    tokens = mm_engine.generate(prompt, 4, stop_tokens=())
    assert tokens[0] == int(whole[-1].argmax())
    assert chunked.generate(prompt, 4, stop_tokens=()) == tokens


def test_the_same_tokens_with_another_image_never_share_kv(mm_dir):
    engine = Engine(
        mm_dir / "model-f32.gguf",
        threads=2,
        mmproj=mm_dir / "mmproj-f32.gguf",
        max_image_tokens=70,
    )
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (96, 96, 3), dtype=np.uint8) for _ in range(2))
    prompt_a = engine.prepare(chat({"type": "image", "image": a}, TEXT))
    prompt_b = engine.prepare(chat({"type": "image", "image": b}, TEXT))
    np.testing.assert_array_equal(prompt_a.token_ids, prompt_b.token_ids)
    offset = prompt_a.media[0].offset
    block = engine.kv_layout.block_size

    cold_b = engine.forward(prompt_b)
    engine.generate(prompt_a, 2, stop_tokens=())
    hits = engine.prefix_cache.stats.hit
    tokens_b = engine.generate(prompt_b, 2, stop_tokens=())
    # Only the blocks before the image can be shared.
    assert engine.prefix_cache.stats.hit - hits == offset // block * block
    assert tokens_b[0] == int(cold_b[-1].argmax())
    hits = engine.prefix_cache.stats.hit
    assert engine.generate(prompt_b, 2, stop_tokens=()) == tokens_b
    # The same image again shares the blocks through it.
    assert engine.prefix_cache.stats.hit - hits > offset + prompt_b.media[0].length


def test_images_are_refused_without_a_projector(mm_dir):
    plain = Engine(mm_dir / "model-f32.gguf", threads=1)
    with pytest.raises(MediaError, match="takes no images"):
        plain.prepare(chat(image(mm_dir / "inputs" / "img0.png"), TEXT))
    with pytest.raises(MediaError, match="takes no images"):
        plain.embed_image(mm_dir / "inputs" / "img0.png")


def test_bad_messages_and_prompts_are_refused(mm_engine, mm_dir, tmp_path):
    with pytest.raises(MediaError, match="no such file"):
        mm_engine.prepare(chat(image(tmp_path / "absent.png"), TEXT))
    with pytest.raises(MediaError, match="needs one of image, url, path"):
        mm_engine.prepare(chat({"type": "image"}, TEXT))
    with pytest.raises(ChatTemplateError, match="2 image placeholders for 1 image parts"):
        mm_engine.prepare(
            chat(image(mm_dir / "inputs" / "img0.png"), {"type": "text", "text": "<|image|>"})
        )
    good = mm_engine.prepare(chat(image(mm_dir / "inputs" / "img0.png"), TEXT))
    media = good.media[0]
    narrow = PlacedMedia(media.offset, media.embeddings[:, :64], media.digest)
    with pytest.raises(MediaError, match="do not fit this model"):
        mm_engine.forward(Prompt(good.token_ids, (narrow,)))
    beyond = PlacedMedia(len(good.token_ids) - 5, media.embeddings, media.digest)
    with pytest.raises(MediaError, match="do not fit this model"):
        mm_engine.forward(Prompt(good.token_ids, (beyond,)))


def test_the_engine_is_checked_against_its_projector(mm_dir, fixtures_dir):
    from pygemma4.mmproj import MmprojMismatchError

    with pytest.raises(MmprojMismatchError):
        Engine(
            fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf",
            threads=1,
            mmproj=mm_dir / "mmproj-f32.gguf",
        )
