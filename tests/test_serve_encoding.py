"""A new image does not stall the streams already running: the decode worker encodes a
prompt's media on a thread of its own while it goes on stepping the other sequences. Real
server processes on real sockets, with the tiny multimodal fixture's projector made deep
enough (its vision blocks repeated) that an image takes a measurable time to encode."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import rewrite_gguf
from gguf import GGUFReader
from PIL import Image
from serve_helpers import ServeProcess
from test_serve_media import chat, image_part, media_serve_args, png_bytes

from pygemma4 import Engine

LAYERS = 32
"""Vision blocks of the deep projector (the fixture's 2, repeated)."""
MAX_IMAGE_TOKENS = 280


@pytest.fixture(scope="module")
def deep_mmproj(mm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The fixture's projector with its vision blocks repeated to LAYERS blocks."""
    source = mm_dir / "mmproj-f32.gguf"
    reader = GGUFReader(source)
    layers = int(reader.fields["clip.vision.block_count"].contents())
    blocks = {t.name: np.array(t.data) for t in reader.tensors if t.name.startswith("v.blk.")}
    repeated = {
        name.replace(f"v.blk.{i}.", f"v.blk.{copy}.", 1): data
        for name, data in blocks.items()
        for i in range(layers)
        if name.startswith(f"v.blk.{i}.")
        for copy in range(i + layers, LAYERS, layers)
    }
    target = tmp_path_factory.mktemp("deep-mmproj") / "mmproj-deep.gguf"
    return rewrite_gguf(source, target, {"clip.vision.block_count": LAYERS}, new_tensors=repeated)


def test_a_new_image_does_not_stall_running_streams(
    mm_dir: Path, deep_mmproj: Path, tmp_path: Path
) -> None:
    model = mm_dir / "model-f32.gguf"
    pixels = np.random.default_rng(0).integers(0, 256, (768, 768, 3), dtype=np.uint8)
    image = png_bytes(Image.fromarray(pixels))
    # How long this image takes to encode here, with the server's threads.
    engine = Engine(model, threads=1, mmproj=deep_mmproj, max_image_tokens=MAX_IMAGE_TOKENS)
    engine.embed_image(image)
    started = time.monotonic()
    assert len(engine.embed_image(image).embeddings) == 256
    encode_time = time.monotonic() - started
    del engine

    args = media_serve_args(deep_mmproj, MAX_IMAGE_TOKENS)
    with ServeProcess.running(model, tmp_path, *args) as server:
        arrivals: list[float] = []
        streaming = threading.Event()

        def stream_text() -> None:
            # Stream after stream until the image is answered: one stream of the context's
            # length may end before the image does on a fast machine.
            try:
                with server.client(timeout=120) as client:
                    while not answered.is_set():
                        with client.stream_chat(chat(text="Count."), 4000, ignore_eos=True) as s:
                            for chunk in s:
                                arrivals.extend([time.monotonic()] * len(chunk.token_ids))
                                if len(arrivals) >= 20:
                                    streaming.set()
                                if answered.is_set():
                                    break
            finally:
                streaming.set()

        answered = threading.Event()
        text = threading.Thread(target=stream_text)
        text.start()
        try:
            streaming.wait(60)
            assert len(arrivals) >= 20, "the text stream did not start"
            with server.client(timeout=120) as client:
                sent = time.monotonic()
                reply = client.chat(chat(image_part(image)), 1, ignore_eos=True)
                replied = time.monotonic()
        finally:
            answered.set()
            text.join(60)
        assert reply.completion_tokens == 1
        assert replied - sent >= encode_time / 2, "the image was encoded too fast to tell"
        # While the image was encoded, prefilled and answered, the text stream went on: no
        # gap between its tokens came near the encoding time.
        during = [t for t in arrivals if sent <= t <= replied]
        gaps = np.diff([sent, *during, replied])
        assert len(during) >= 10, (len(during), encode_time)
        assert gaps.max() < encode_time / 2, (gaps.max(), encode_time)
