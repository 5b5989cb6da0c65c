"""The image budget chosen per request and per image part: the start-up `max_image_tokens` is
the default and the most; `engine.prepare(..., max_image_tokens=)`, an image part's own
`max_image_tokens`, the server's `max_image_tokens` field (HTTP body, ZeroMQ client) and OpenAI's
`image_url.detail` pick each image's soft tokens, as many as transformers' processor makes at
that budget; the engine and the server give the same greedy steps at a smaller budget; bad
budgets and details are refused naming the value and the allowed ones. Real engine, real server
processes, the tiny multimodal fixture."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import openai
import pytest
from PIL import Image
from test_serve_media import (
    NEW_TOKENS,
    TOP,
    Steps,
    as_bytes,
    assert_same_steps,
    chat,
    client_steps,
    data_uri,
    http_media_server,
    http_reply,
    http_steps,
    image_part,
    png_bytes,
    served_engine,
)

from pygemma4 import Engine, SamplingParams
from pygemma4.client import ServerError
from pygemma4.errors import MediaError

transformers = pytest.importorskip("transformers")
from transformers.models.gemma4.image_processing_pil_gemma4 import (  # noqa: E402
    Gemma4ImageProcessorPil,
)

CEILING = 140
"""The start-up budget of the engine and the server here: the default and the most."""
SMALL = 70


def hf_soft_tokens(png: Path, budget: int) -> int:
    """The soft tokens transformers' Gemma 4 processor makes of the image at `budget`."""
    processor = Gemma4ImageProcessorPil(max_soft_tokens=budget)
    out = processor(images=[Image.open(png).convert("RGB")], return_tensors="np")
    return int(out["num_soft_tokens_per_image"][0])


def detail_part(png: bytes, detail: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": data_uri(png), "detail": detail}}


@pytest.fixture(scope="module")
def pngs(mm_dir: Path) -> dict[str, Path]:
    return {name: mm_dir / "inputs" / f"{name}.png" for name in ("img0", "img1")}


@pytest.fixture(scope="module")
def engine(mm_dir: Path) -> Engine:
    return served_engine(mm_dir, CEILING)


@pytest.fixture(scope="module")
def server(mm_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    with http_media_server(mm_dir, tmp_path_factory.mktemp("serve-budget"), CEILING) as serve:
        yield serve


@pytest.fixture
def sdk(server: Any) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=server.base_url + "/v1", api_key="none", max_retries=0) as c:
        yield c


def test_the_fixture_images_differ_between_the_budgets(pngs: dict[str, Path]) -> None:
    for png in pngs.values():
        assert hf_soft_tokens(png, SMALL) < hf_soft_tokens(png, CEILING)


@pytest.mark.parametrize(
    ("part", "request_budget", "budget"),
    [
        ({}, None, CEILING),
        ({}, SMALL, SMALL),
        ({}, CEILING, CEILING),
        ({"max_image_tokens": SMALL}, None, SMALL),
        ({"max_image_tokens": CEILING}, SMALL, CEILING),
        ({"detail": "low"}, None, SMALL),
        ({"detail": "high"}, SMALL, CEILING),
        ({"detail": "auto"}, SMALL, SMALL),
        ({"detail": "auto"}, None, CEILING),
    ],
)
def test_the_engine_gives_each_image_its_budget(
    engine: Engine, pngs: dict[str, Path], part: dict[str, Any], request_budget, budget: int
) -> None:
    png = pngs["img0"]
    if "detail" in part:
        image = detail_part(png.read_bytes(), part["detail"])
    else:
        image = {"type": "image", "image": str(png), **part}
    prompt = engine.prepare(chat(image), max_image_tokens=request_budget)
    (placed,) = prompt.media
    assert placed.length == hf_soft_tokens(png, budget)
    expected = engine.embed_image(png, budget)
    assert expected.n_tokens == placed.length
    np.testing.assert_array_equal(placed.embeddings, expected.embeddings)


def test_two_images_of_a_chat_take_their_own_budgets(engine: Engine, pngs: dict[str, Path]) -> None:
    messages = chat(
        {"type": "image", "image": str(pngs["img0"]), "max_image_tokens": SMALL},
        {"type": "image", "image": str(pngs["img1"])},
    )
    first, second = engine.prepare(messages).media
    assert first.length == hf_soft_tokens(pngs["img0"], SMALL)
    assert second.length == hf_soft_tokens(pngs["img1"], CEILING)
    first, second = engine.prepare(messages, max_image_tokens=SMALL).media
    assert second.length == hf_soft_tokens(pngs["img1"], SMALL)


def test_the_same_image_at_two_budgets_is_two_media(engine: Engine, pngs: dict[str, Path]) -> None:
    messages = chat({"type": "image", "image": str(pngs["img0"])})
    small = engine.prepare(messages, max_image_tokens=SMALL).media[0]
    large = engine.prepare(messages).media[0]
    assert small.digest != large.digest
    assert engine.prepare(messages, max_image_tokens=SMALL).media[0].digest == small.digest


BAD_BUDGETS = [
    ({}, 280, ["280", f"{CEILING}", "allowed: 70, 140"]),
    ({}, 1120, ["1120", f"{CEILING}"]),
    ({}, 100, ["100", "70, 140, 280, 560, 1120", "low, high, auto"]),
    ({"max_image_tokens": 560}, None, ["560", f"{CEILING}"]),
    ({"max_image_tokens": 0}, SMALL, ["not 0", "70, 140, 280, 560, 1120"]),
    ({"detail": "medium"}, None, ["'medium'", "low, high, auto"]),
]


@pytest.mark.parametrize(("part", "request_budget", "words"), BAD_BUDGETS)
def test_the_engine_refuses_bad_budgets_naming_them(
    engine: Engine, pngs: dict[str, Path], part: dict[str, Any], request_budget, words
) -> None:
    if "detail" in part:
        image = detail_part(pngs["img0"].read_bytes(), part["detail"])
    else:
        image = {"type": "image", "image": str(pngs["img0"]), **part}
    with pytest.raises(MediaError) as refused:
        engine.prepare(chat(image), max_image_tokens=request_budget)
    for word in words:
        assert word in str(refused.value)


def test_the_engine_refuses_a_request_budget_above_the_most_without_images(
    engine: Engine,
) -> None:
    with pytest.raises(MediaError, match=f"280 is more than {CEILING}"):
        engine.prepare(chat(), max_image_tokens=280)
    with pytest.raises(MediaError, match=f"280 is more than {CEILING}"):
        engine.embed_image(np.zeros((40, 60, 3), np.uint8), 280)


def engine_steps(engine: Engine, messages: list[dict[str, Any]], budget: int | None) -> Steps:
    prompt = engine.prepare(messages, max_image_tokens=budget)
    sampling = SamplingParams(temperature=0, logprobs=TOP)
    chunks = engine.stream(prompt, NEW_TOKENS, sampling, stop_tokens=())
    return [(c.token_id, list(c.sampled.top_logprobs)) for c in chunks]


def test_the_server_at_a_small_budget_gives_the_engines_steps(
    server: Any, sdk: openai.OpenAI, engine: Engine, pngs: dict[str, Path]
) -> None:
    messages = chat(image_part(pngs["img1"].read_bytes()))
    prompt = engine.prepare(messages, max_image_tokens=SMALL)
    assert prompt.media[0].length == hf_soft_tokens(pngs["img1"], SMALL)
    expected = engine_steps(engine, messages, SMALL)
    reply = http_reply(sdk, server, messages, max_image_tokens=SMALL)
    assert reply.usage.prompt_tokens == len(prompt)
    assert_same_steps(http_steps(reply), as_bytes(expected, engine))
    with server.client(timeout=120) as client:
        result = client.chat(
            messages,
            NEW_TOKENS,
            temperature=0,
            ignore_eos=True,
            logprobs=TOP,
            max_image_tokens=SMALL,
        )
    assert result.prompt_tokens == len(prompt)
    steps = client_steps(result)
    assert_same_steps(steps, expected)


@pytest.mark.parametrize(
    ("detail", "request_budget", "budget"),
    [
        ("low", None, SMALL),
        ("high", SMALL, CEILING),
        ("auto", SMALL, SMALL),
        (None, None, CEILING),
    ],
)
def test_the_server_gives_each_image_its_budget(
    server: Any,
    sdk: openai.OpenAI,
    engine: Engine,
    pngs: dict[str, Path],
    detail: str | None,
    request_budget: int | None,
    budget: int,
) -> None:
    png = pngs["img0"].read_bytes()
    messages = chat(image_part(png) if detail is None else detail_part(png, detail))
    expected = len(engine.prepare(chat(image_part(png)), max_image_tokens=budget))
    extra = {} if request_budget is None else {"max_image_tokens": request_budget}
    reply = sdk.chat.completions.create(
        model=server.model_name,
        messages=messages,  # type: ignore[arg-type]
        max_tokens=1,
        extra_body=extra,
    )
    assert reply.usage.prompt_tokens == expected
    with server.client(timeout=60) as client:
        assert client.chat(messages, 1, **extra).prompt_tokens == expected


def test_the_server_refuses_bad_budgets_naming_them(
    server: Any, sdk: openai.OpenAI, pngs: dict[str, Path]
) -> None:
    png = pngs["img0"].read_bytes()
    cases = [(chat(), request, words) for _, request, words in BAD_BUDGETS[:3]]
    cases.append((chat(detail_part(png, "medium")), None, BAD_BUDGETS[-1][2]))
    cases.append((chat(image_part(png)), 280, BAD_BUDGETS[0][2]))
    with server.client(timeout=60) as client:
        for messages, request, words in cases:
            with pytest.raises(ServerError) as refused:
                client.chat(messages, 1, max_image_tokens=request)
            assert refused.value.code == "bad_request"
            for word in words:
                assert word in refused.value.message, (request, refused.value.message)
        with pytest.raises(TypeError, match="max_image_tokens must be an int"):
            client.chat(chat(), 1, max_image_tokens="70")  # type: ignore[arg-type]
    for messages, request, words in cases:
        with pytest.raises(openai.BadRequestError) as error:
            sdk.chat.completions.create(
                model=server.model_name,
                messages=messages,  # type: ignore[arg-type]
                max_tokens=1,
                extra_body={} if request is None else {"max_image_tokens": request},
            )
        for word in words:
            assert word in error.value.message, (request, error.value.message)
    assert server.health().ok


def test_the_prefix_cache_tells_an_image_at_two_budgets_apart(
    server: Any, sdk: openai.OpenAI, engine: Engine, pngs: dict[str, Path]
) -> None:
    # An image of its own (img1 mirrored), so that no earlier test's blocks are found.
    mirrored = png_bytes(Image.open(pngs["img1"]).transpose(Image.Transpose.FLIP_LEFT_RIGHT))
    messages = chat(image_part(mirrored))
    (image,) = engine.prepare(messages).media

    def cached(budget: int | None) -> int:
        reply = sdk.chat.completions.create(
            model=server.model_name,
            messages=messages,  # type: ignore[arg-type]
            max_tokens=1,
            extra_body={} if budget is None else {"max_image_tokens": budget},
        )
        return reply.usage.prompt_tokens_details.cached_tokens

    cached(None)
    assert cached(CEILING) >= image.offset + image.length
    assert cached(SMALL) <= image.offset
