"""The unified (12B-style) models' images: the `gemma4uv` block projector and its preprocessing
against transformers' references for the tiny unified fixture (its processor's pixel blocks to
the byte, the rows that replace the `<|image|>` tokens), and torchvision's uint8 resize."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from pygemma4.errors import MediaError, UnsupportedModelError
from pygemma4.media.image_blocks import ImageBlockEncoder
from pygemma4.media.kinds import PreparedMedia
from pygemma4.media.resize import resize_bicubic_uint8

EMBEDDING_ATOL = 1e-5


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
    embeddings = encoder.embed(unified / "inputs" / f"img{k}.png")
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
