"""Images and audio through the server: `pygemma4 serve --mmproj` takes OpenAI's `image_url`
(data URIs) and `input_audio` parts over HTTP (the `openai` SDK) and over ZeroMQ (the client),
gives the engine's and the `generate` command's greedy tokens for the same chats, refuses bad
media, media it has no tower for and images it would have to fetch with a 400 naming the
problem (and goes on serving), reports what it takes, and keys its prefix cache by the
media's content. Real server processes on real sockets, with the tiny multimodal fixture."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import struct
import wave
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image
from serve_helpers import ServeProcess, free_port, run_serve
from test_cli import run_cli

from pygemma4 import Engine, SamplingParams
from pygemma4.client import AsyncClient, ServerError
from pygemma4.protocol import (
    DecodeInbox,
    InboxDecoder,
    MediaFeatures,
    ProtocolError,
    Sampling,
    TokenizedRequest,
    encode,
    encode_frames,
)

MAX_IMAGE_TOKENS = 70
NEW_TOKENS = 8
QUESTION = "What is in here?"
TOP = 5
"""Alternatives compared at each step: the tiny random model's greedy tokens hardly depend on
its input, the likelihoods of the runners-up do (they differ from chat to chat)."""
TOLERANCE = 1e-4

Steps = list[tuple[Any, list[tuple[Any, float]]]]
"""Each generated token with the TOP likeliest tokens and their log-probabilities (tokens as
ids, or as their bytes where the HTTP API gives only those)."""


def engine_steps(engine: Engine, messages: list[dict[str, Any]], n: int = NEW_TOKENS) -> Steps:
    prompt = engine.prepare(messages)
    sampling = SamplingParams(temperature=0, logprobs=TOP)
    chunks = engine.stream(prompt, n, sampling, stop_tokens=())
    return [(c.token_id, list(c.sampled.top_logprobs)) for c in chunks]


def assert_same_steps(got: Steps, expected: Steps) -> None:
    assert [t for t, _ in got] == [t for t, _ in expected]
    for (_, ours), (_, theirs) in zip(got, expected, strict=True):
        assert [t for t, _ in ours] == [t for t, _ in theirs]
        assert np.allclose([lp for _, lp in ours], [lp for _, lp in theirs], atol=TOLERANCE)


def data_uri(png: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(png).decode()}"


def image_part(png: bytes, mime: str = "image/png") -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(png, mime)}}


def audio_part(wav: bytes, fmt: str = "wav") -> dict[str, Any]:
    return {
        "type": "input_audio",
        "input_audio": {"data": base64.b64encode(wav).decode(), "format": fmt},
    }


def chat(*parts: dict[str, Any], text: str = QUESTION) -> list[dict[str, Any]]:
    """One user turn: the media parts, then the text (the order `generate` gives them)."""
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


def wav_bytes(samples: np.ndarray, rate: int = 16_000) -> bytes:
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(rate)
        w.writeframes(samples.astype("<i2").tobytes())
    return out.getvalue()


def png_bytes(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims width × height pixels, with a few bytes of data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="module")
def media(mm_dir: Path) -> dict[str, bytes]:
    inputs = mm_dir / "inputs"
    img0 = Image.open(inputs / "img0.png").convert("RGB")
    return {
        "img0": (inputs / "img0.png").read_bytes(),
        "img1": (inputs / "img1.png").read_bytes(),
        "aud0": (inputs / "aud0.wav").read_bytes(),
        "aud1": (inputs / "aud1.wav").read_bytes(),
        # The same size as img0 (so the same soft tokens at the same positions), other pixels.
        "img0_inverted": png_bytes(Image.fromarray(255 - np.asarray(img0))),
    }


def served_engine(mm_dir: Path, max_image_tokens: int = MAX_IMAGE_TOKENS) -> Engine:
    """The engine of the tiny multimodal model as `media_serve_args` serve it."""
    return Engine(
        mm_dir / "model-f32.gguf",
        threads=1,
        mmproj=mm_dir / "mmproj-f32.gguf",
        max_image_tokens=max_image_tokens,
    )


@pytest.fixture(scope="module")
def engine(mm_dir: Path) -> Engine:
    return served_engine(mm_dir)


def media_serve_args(mmproj: Path, max_image_tokens: int = MAX_IMAGE_TOKENS) -> tuple[str, ...]:
    """`serve` options for the tiny multimodal model: the projector `mmproj`, an image budget,
    one thread and four sequences."""
    return (
        "--mmproj",
        str(mmproj),
        "--max-image-tokens",
        str(max_image_tokens),
        "--threads",
        "1",
        "--max-batch",
        "4",
    )


@contextmanager
def http_media_server(
    mm_dir: Path, workdir: Path, max_image_tokens: int = MAX_IMAGE_TOKENS
) -> Iterator[Any]:
    """The tiny multimodal model served with its projector, HTTP on a free port (the server's
    `base_url` and `model_name` set)."""
    listen = f"127.0.0.1:{free_port()}"
    args = (*media_serve_args(mm_dir / "mmproj-f32.gguf", max_image_tokens), "--http", listen)
    model = mm_dir / "model-f32.gguf"
    with ServeProcess.running(model, workdir, *args) as serve:
        serve.base_url = f"http://{listen}"
        serve.model_name = model.name
        yield serve


@pytest.fixture(scope="module")
def server(mm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with http_media_server(mm_dir, tmp_path_factory.mktemp("serve-mm")) as serve:
        yield serve


@pytest.fixture
def sdk(server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def http_reply(
    sdk: openai.OpenAI, server: Any, messages: list[dict[str, Any]], **extra: Any
) -> Any:
    """The greedy reply of the HTTP API, with TOP logprobs (`extra`: more body fields)."""
    return sdk.chat.completions.create(
        model=server.model_name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=NEW_TOKENS,
        temperature=0,
        logprobs=True,
        top_logprobs=TOP,
        extra_body={"ignore_eos": True, **extra},
    )


def http_steps(reply: Any) -> Steps:
    """The steps of an HTTP reply, tokens as their bytes."""
    return [
        (bytes(step.bytes), [(bytes(alt.bytes), alt.logprob) for alt in step.top_logprobs])
        for step in reply.choices[0].logprobs.content
    ]


def client_steps(result: Any) -> Steps:
    """The steps of a client's chat result (or streamed chunk) with its top logprobs."""
    assert result.logprobs is not None
    return [
        (t, [tuple(alt) for alt in lp.top])
        for t, lp in zip(result.token_ids, result.logprobs, strict=True)
    ]


def as_bytes(steps: Steps, engine: Engine) -> Steps:
    """`steps` with each token id given as its bytes."""
    text = engine.tokenizer.token_bytes
    return [(text(t), [(text(a), lp) for a, lp in top]) for t, top in steps]


def zmq_steps(server: Any, messages: list[dict[str, Any]]) -> tuple[int, Steps]:
    """The prompt tokens and greedy steps of a chat over ZeroMQ."""
    with server.client(timeout=120) as client:
        result = client.chat(messages, NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=TOP)
    return result.prompt_tokens, client_steps(result)


def cli_steps(
    model_dir: Path, images: tuple[str, ...], clips: tuple[str, ...], tmp_path: Path
) -> tuple[int, Steps]:
    """The prompt tokens and greedy steps of `pygemma4 generate --mmproj` on the fixture in
    `model_dir` with its inputs `images` and `clips`, then QUESTION."""
    cli = run_cli(
        "generate",
        str(model_dir / "model-f32.gguf"),
        "--mmproj",
        str(model_dir / "mmproj-f32.gguf"),
        *(a for i in images for a in ("--image", str(model_dir / "inputs" / f"{i}.png"))),
        *(a for c in clips for a in ("--audio", str(model_dir / "inputs" / f"{c}.wav"))),
        "--max-image-tokens",
        str(MAX_IMAGE_TOKENS),
        QUESTION,
        "--max-tokens",
        str(NEW_TOKENS),
        "--logprobs",
        str(TOP),
        "--ignore-eos",
        "--json",
        "--threads",
        "1",
        cache=tmp_path,
    )
    assert cli.returncode == 0, cli.stderr
    out = json.loads(cli.stdout)
    steps = [
        (step["token_id"], [(alt["token_id"], alt["logprob"]) for alt in step["top"]])
        for step in out["logprobs"]
    ]
    return out["prompt_tokens"], steps


CHATS = {
    "image": (("img0",), ()),
    "audio": ((), ("aud0",)),
    "image+audio": (("img1",), ("aud1",)),
}


@pytest.mark.parametrize("name", list(CHATS))
def test_greedy_tokens_equal_the_engines_and_the_clis(
    name: str, server: Any, sdk: openai.OpenAI, engine: Engine, media, mm_dir: Path, tmp_path: Path
) -> None:
    images, clips = CHATS[name]
    messages = chat(*(image_part(media[i]) for i in images), *(audio_part(media[c]) for c in clips))
    prompt = engine.prepare(messages)
    assert len(prompt.media) == len(images) + len(clips)
    expected = engine_steps(engine, messages)

    prompt_tokens, steps = zmq_steps(server, messages)
    assert prompt_tokens == len(prompt)
    assert_same_steps(steps, expected)

    reply = http_reply(sdk, server, messages)
    assert reply.usage.prompt_tokens == len(prompt)
    assert_same_steps(http_steps(reply), as_bytes(expected, engine))

    prompt_tokens, steps = cli_steps(mm_dir, images, clips, tmp_path)
    assert prompt_tokens == len(prompt)
    assert_same_steps(steps, expected)


def test_streamed_media_chat_over_zeromq(server: Any, engine: Engine, media) -> None:
    messages = chat(image_part(media["img1"]), audio_part(media["aud0"]))
    expected = engine_steps(engine, messages)
    options = {"temperature": 0, "ignore_eos": True, "logprobs": TOP}
    with (
        server.client(timeout=120) as client,
        client.stream_chat(messages, NEW_TOKENS, **options) as stream,
    ):
        steps = [step for chunk in stream for step in client_steps(chunk)]
    assert_same_steps(steps, expected)


def test_media_chats_paused_on_a_small_pool_resume_with_the_engines_tokens(
    mm_dir: Path, tmp_path: Path, engine: Engine, media
) -> None:
    # 24 blocks of 16 positions for four chats of about 200 positions each: the youngest are
    # paused while the pool is short, their KV left in the prefix cache under their media's
    # names, and resume (the prompt's model tokens and the media's rows fed again).
    chats = [
        chat(image_part(media["img0"]), text="one"),
        chat(audio_part(media["aud0"]), text="two"),
        chat(image_part(media["img1"]), audio_part(media["aud1"]), text="three"),
        chat(image_part(media["img0_inverted"]), text="four"),
    ]
    length = 120
    expected = [engine_steps(engine, messages, length) for messages in chats]
    prompts = [len(engine.prepare(messages)) for messages in chats]
    args = (*media_serve_args(mm_dir / "mmproj-f32.gguf"), "--kv-tokens", "384")
    with ServeProcess.running(mm_dir / "model-f32.gguf", tmp_path, *args) as server:

        async def run() -> list[Steps]:
            async with AsyncClient(server.endpoint, timeout=120) as client:

                async def one(messages: list[dict[str, Any]]) -> Steps:
                    result = await client.chat(
                        messages, length, temperature=0, ignore_eos=True, logprobs=TOP
                    )
                    return client_steps(result)

                return list(await asyncio.gather(*(one(m) for m in chats)))

        for got, want in zip(asyncio.run(run()), expected, strict=True):
            assert_same_steps(got, want)
        health = server.health()
        assert health.requests_in_flight == 0 and health.kv_blocks_used == 0
        # Some sequences started more than once: they were paused and resumed.
        assert health.prefix_looked_up > sum(n - 1 for n in prompts)


def test_the_prefix_cache_keys_media_blocks_by_content(
    sdk: openai.OpenAI, server: Any, engine: Engine, media
) -> None:
    # A prompt of its own (the text), so that no earlier test's blocks are found.
    text = "Describe the colours, then count the stripes."
    first = chat(image_part(media["img0"]), text=text)
    prompt = engine.prepare(first)
    (image,) = prompt.media
    end_of_image = image.offset + image.length
    assert len(prompt) - end_of_image > 16, "the prompt must hold a full block after the image"

    def cached(messages: list[dict[str, Any]]) -> tuple[int, Steps]:
        reply = http_reply(sdk, server, messages)
        return reply.usage.prompt_tokens_details.cached_tokens, http_steps(reply)

    cold, _ = cached(first)
    assert cold <= image.offset
    again, _ = cached(first)
    assert again >= end_of_image

    other = chat(image_part(media["img0_inverted"]), text=text)
    other_prompt = engine.prepare(other)
    assert np.array_equal(other_prompt.token_ids, prompt.token_ids)
    assert other_prompt.media[0].digest != image.digest
    reused, steps = cached(other)
    # Blocks before the image may be shared; none that holds any of its positions.
    assert reused <= image.offset
    assert_same_steps(steps, as_bytes(engine_steps(engine, other), engine))


def test_info_and_models_report_vision_and_audio(server: Any, sdk: openai.OpenAI) -> None:
    with server.client() as client:
        info = client.info()
    assert info.vision and info.audio
    assert info.max_image_tokens == MAX_IMAGE_TOKENS
    card = sdk.models.retrieve(server.model_name)
    assert card.model_extra["input_modalities"] == ["text", "image", "audio"]


def bad_media(media: dict[str, bytes]) -> list[tuple[str, dict[str, Any], str]]:
    """(name, content part, words of the error) for media the server must refuse."""
    png = media["img0"]
    tone = (np.sin(np.arange(16_000 * 31) * 0.05) * 8000).astype(np.int16)
    return [
        ("truncated png", image_part(png[: len(png) // 2]), "corrupt or truncated"),
        ("png bomb", image_part(png_claiming(100_000, 100_000)), "decompression bomb"),
        ("not an image", image_part(b"hello, world" * 10), "not a PNG, JPEG or WEBP"),
        ("empty image", image_part(b""), "empty"),
        ("text data uri", image_part(png, "text/plain"), "not an image"),
        (
            "bad base64 image",
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@"}},
            "base64",
        ),
        (
            "http url",
            {"type": "image_url", "image_url": {"url": "http://example.com/cat.png"}},
            "only data: URIs",
        ),
        (
            "https url",
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            "only data: URIs",
        ),
        (
            "file path",
            {"type": "image_url", "image_url": {"url": "/etc/hostname"}},
            "only data: URIs",
        ),
        ("not a wav", audio_part(png), "not a WAV file"),
        ("truncated wav", audio_part(media["aud0"][:30]), "WAV"),
        ("too long clip", audio_part(wav_bytes(tone)), "exceeds the model's limit of 30 s"),
        ("silent clip", audio_part(wav_bytes(np.zeros(16_000, np.int16))), "silent"),
        ("mp3", audio_part(media["aud0"], "mp3"), "only 'wav' is read"),
        (
            "bad base64 audio",
            {"type": "input_audio", "input_audio": {"data": "%%%", "format": "wav"}},
            "base64",
        ),
    ]


def test_bad_media_is_refused_and_the_server_goes_on(
    server: Any, sdk: openai.OpenAI, engine: Engine, media
) -> None:
    cases = bad_media(media)
    with server.client(timeout=60) as client:
        for name, part, words in cases:
            with pytest.raises(ServerError) as refused:
                client.chat(chat(part), 4, temperature=0)
            assert refused.value.code == "bad_request", name
            assert words in refused.value.message, (name, refused.value.message)
    for name, part, words in cases:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.chat.completions.create(
                model=server.model_name,
                messages=chat(part),
                max_tokens=4,  # type: ignore[arg-type]
            )
        assert words in error.value.message, (name, error.value.message)
    assert server.health().ok
    messages = chat(image_part(media["img0"]))
    expected = engine_steps(engine, messages)
    with server.client(timeout=120) as client:
        result = client.chat(messages, NEW_TOKENS, temperature=0, ignore_eos=True, logprobs=TOP)
    steps = client_steps(result)
    assert_same_steps(steps, expected)
    assert all(w.restarts == 0 for w in server.workers())


def test_media_without_mmproj_is_refused(mm_dir: Path, tmp_path: Path, media) -> None:
    listen = f"127.0.0.1:{free_port()}"
    model = mm_dir / "model-f32.gguf"
    args = ("--threads", "1", "--http", listen)
    with ServeProcess.running(model, tmp_path, *args) as serve:
        with serve.client(timeout=60) as client:
            assert not client.info().vision and not client.info().audio
            for part in (image_part(media["img0"]), audio_part(media["aud0"])):
                with pytest.raises(ServerError, match="started without --mmproj"):
                    client.chat(chat(part), 4)
            assert client.chat(chat(), 2, temperature=0).completion_tokens == 2
        base = f"http://{listen}/v1"
        with openai.OpenAI(base_url=base, api_key="none", max_retries=0) as sdk:
            assert sdk.models.retrieve(model.name).model_extra["input_modalities"] == ["text"]
            with pytest.raises(openai.BadRequestError, match="started without --mmproj"):
                sdk.chat.completions.create(
                    model=model.name,
                    messages=chat(image_part(media["img0"])),  # type: ignore[arg-type]
                    max_tokens=4,
                )


@pytest.mark.parametrize(
    ("model", "mmproj", "words"),
    [
        ("gemma4-tiny-mm/model-f32.gguf", "gemma4-tiny-mm/model-f32.gguf", "not 'clip'"),
        ("gemma4-tiny-mm/model-f32.gguf", "absent.gguf", "absent.gguf"),
        ("gemma4-tiny-e/model-f32.gguf", "gemma4-tiny-mm/mmproj-f32.gguf", "does not fit model"),
    ],
)
def test_a_bad_projector_stops_serve_at_once(
    fixtures_dir: Path, tmp_path: Path, model: str, mmproj: str, words: str
) -> None:
    result = run_serve(fixtures_dir / model, "--mmproj", str(fixtures_dir / mmproj), cwd=tmp_path)
    assert result.returncode != 0
    assert words in result.stderr and "Traceback" not in result.stderr, result.stderr


def tokenized(media: list[MediaFeatures]) -> TokenizedRequest:
    return TokenizedRequest(
        rid=1,
        prompt_ids=[2, 9, 11, 11, 10],
        max_tokens=4,
        sampling=Sampling(),
        stop_token_ids=[1],
        tokenizer=0,
        media=media,
    )


def test_media_features_travel_as_raw_frames_beside_a_small_message() -> None:
    features = np.arange(2 * 768, dtype=np.float32).reshape(2, 768)
    one = MediaFeatures(
        kind="image",
        offset=2,
        n_tokens=2,
        digest="d",
        rows=2,
        cols=768,
        grid=(1, 2),
        data=features.tobytes(),
    )
    frames = encode_frames(tokenized([one, one]))
    assert len(frames) == 3 and len(frames[0]) < 300  # the features are not in it
    assert frames[1] == frames[2] == features.tobytes()
    decoder = InboxDecoder("decode", DecodeInbox)
    assert decoder.decode_frames(frames) == tokenized([one, one])
    with pytest.raises(ProtocolError, match="2 media came with 1 payload frames"):
        decoder.decode_frames(frames[:2])
    with pytest.raises(ProtocolError, match="a frame of 12 bytes for float32"):
        decoder.decode_frames([frames[0], frames[1], b"x" * 12])
    with pytest.raises(ProtocolError, match="0 media came with 1 payload frames"):
        decoder.decode_frames([encode(tokenized([])), b"x"])
