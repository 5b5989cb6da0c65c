"""Multimodal prompts: chat messages with image and audio parts, rendered by the model's chat
template, each medium's placeholder expanded into its soft tokens and paired with its embeddings.

An image part is `{"type": "image", "image": <path | bytes | PIL image | array>}` (or `"url"` /
`"path"` in place of `"image"`), optionally with `"max_image_tokens": 70 | 140 | ...` (its own
budget), or OpenAI's `{"type": "image_url", "image_url": {"url": "data:image/png;base64,...",
"detail": "low" | "high" | "auto"}}`. The template writes one `<|image|>` per image; like the
model's processor, the prompt puts `<|image>`, one `<|image|>` per soft token, and `<image|>` in
its place. The model sees the image's embeddings at those soft tokens.

An audio part is `{"type": "audio", "audio": <path | WAV bytes | float array at 16 kHz>}` (or
`"path"`), or OpenAI's `{"type": "input_audio", "input_audio": {"data": <base64 WAV>, "format":
"wav"}}`; the template writes `<|audio|>`, which becomes `<|audio>`, one `<|audio|>` per soft
token, and `<audio|>`.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ChatTemplateError, MediaError
from .media.kinds import AUDIO, IMAGE, MediaKind, PreparedMedia
from .media.prepared import ImageBudget
from .prefix_cache import MediaKey
from .runner import Embeddings
from .tokenizer import Tokenizer

__all__ = [
    "AUDIO",
    "IMAGE",
    "MediaKind",
    "MediaPart",
    "PlacedMedia",
    "PreparedPrompt",
    "Prompt",
    "media_pad_id",
    "media_parts",
    "model_tokens",
    "prepare_chat",
    "prepare_prompt",
]


def media_pad_id(metadata: Mapping[str, Any]) -> int:
    """The token whose per-layer embeddings media positions take: the model's padding token
    (of its GGUF `metadata`)."""
    pad = metadata.get("tokenizer.ggml.padding_token_id", 0)
    assert isinstance(pad, int)
    return pad


def model_tokens(token_ids: np.ndarray, media: Sequence[MediaKey], pad_id: int) -> np.ndarray:
    """The ids the model's embedding tables read of a prompt holding `media`: the padding id
    at their soft tokens."""
    ids = np.asarray(token_ids, dtype=np.int32).copy()
    for m in media:
        ids[m.offset : m.offset + m.length] = pad_id
    return ids


@dataclass(frozen=True)
class PlacedMedia:
    """One image or clip in a prompt: its soft tokens start at `offset`; `embeddings` float32
    [n, n_embd] replace them; `digest` names its content; with `bidirectional` its soft tokens
    attend to each other in both directions (the unified models' images)."""

    offset: int
    embeddings: np.ndarray
    digest: str
    bidirectional: bool = False

    @property
    def length(self) -> int:
        return int(self.embeddings.shape[0])


@dataclass(frozen=True)
class Prompt:
    """A prompt ready for the model: `token_ids` (int32, soft tokens placed) and the media whose
    embeddings replace those soft tokens (`Engine.forward`, `generate` and `stream` take it in
    place of token ids)."""

    token_ids: np.ndarray
    media: tuple[PlacedMedia, ...] = ()

    def __len__(self) -> int:
        return len(self.token_ids)

    def model_tokens(self, pad_id: int) -> np.ndarray:
        """The ids the model's embedding tables read: the padding id at soft tokens (whose
        per-layer embeddings are the padding token's)."""
        return model_tokens(self.token_ids, self.media_keys(), pad_id)

    def embeddings(self) -> Embeddings | None:
        """The rows the media's embeddings replace, for a feed of the whole prompt."""
        if not self.media:
            return None
        offsets = np.concatenate(
            [np.arange(m.offset, m.offset + m.length, dtype=np.int32) for m in self.media]
        )
        spans = [(m.offset, m.offset + m.length) for m in self.media if m.bidirectional]
        return Embeddings(
            offsets,
            np.concatenate([m.embeddings for m in self.media]),
            np.asarray(spans, dtype=np.int32).reshape(-1, 2),
        )

    def media_keys(self) -> tuple[MediaKey, ...]:
        """What the prefix cache names the media's positions by (their content)."""
        return tuple(MediaKey(m.offset, m.length, m.digest, m.bidirectional) for m in self.media)


@dataclass(frozen=True)
class PreparedPrompt:
    """A prompt whose media are prepared for their towers but not encoded yet: `token_ids`
    (int32, soft tokens placed) and each image or clip with the offset of its first soft
    token."""

    token_ids: np.ndarray
    media: tuple[tuple[int, PreparedMedia], ...] = ()

    def encoded(self, encode: Callable[[PreparedMedia], np.ndarray]) -> Prompt:
        """The prompt with the embeddings `encode` makes of each medium."""
        placed = [
            PlacedMedia(offset, encode(m), m.digest, m.bidirectional) for offset, m in self.media
        ]
        return Prompt(self.token_ids, tuple(placed))


@dataclass(frozen=True)
class MediaPart:
    """An image or clip of a chat: its `kind`, its `source` and, for an image, the `budget` its
    part asks for (`max_image_tokens`, or OpenAI's `detail`; None: the request's)."""

    kind: MediaKind
    source: Any
    budget: ImageBudget = None


def media_parts(
    messages: Sequence[Mapping[str, Any]],
) -> tuple[list[dict[str, Any]], list[MediaPart]]:
    """The messages with every image part reduced to `{"type": "image"}` and every audio part
    to `{"type": "audio"}` (what the chat template renders), and the media in the order they
    appear."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of mappings")
    media: list[MediaPart] = []
    rendered = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise ChatTemplateError(f"message {i} is not a mapping")
        content = message.get("content")
        if not isinstance(content, (list, tuple)):
            rendered.append(dict(message))
            continue
        parts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                source = _source(part, ("image", "url", "path"), "an image", i, j)
                media.append(MediaPart(IMAGE, source, part.get("max_image_tokens")))
            elif kind == "image_url":
                url = part.get("image_url")
                spec = url if isinstance(url, Mapping) else {"url": url}
                source = _source({"url": spec.get("url")}, ("url",), "an image", i, j)
                media.append(MediaPart(IMAGE, source, spec.get("detail")))
            elif kind == "audio":
                media.append(MediaPart(AUDIO, _source(part, ("audio", "path"), "an audio", i, j)))
            elif kind == "input_audio":
                media.append(MediaPart(AUDIO, _input_audio(part.get("input_audio"), i, j)))
            else:
                parts.append(part)
                continue
            parts.append({"type": media[-1].kind.name})
        rendered.append({**message, "content": parts})
    return rendered, media


def _source(part: Mapping[str, Any], keys: tuple[str, ...], what: str, i: int, j: int) -> Any:
    for key in keys:
        if part.get(key) is not None:
            return part[key]
    raise MediaError(f"message {i} content part {j}: {what} part needs one of {', '.join(keys)}")


def _input_audio(spec: Any, i: int, j: int) -> bytes:
    """The WAV bytes of an OpenAI `input_audio` part `{"data": base64, "format": "wav"}`."""
    where = f"message {i} content part {j}"
    if not isinstance(spec, Mapping) or not isinstance(spec.get("data"), str):
        raise MediaError(f'{where}: input_audio must be {{"data": base64, "format": "wav"}}')
    if spec.get("format", "wav") != "wav":
        raise MediaError(f"{where}: audio format {spec.get('format')!r}; only 'wav' is read")
    try:
        return base64.b64decode(spec["data"], validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: input_audio data is not valid base64") from None


def prepare_chat(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    prepare: Callable[[MediaPart], PreparedMedia],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> PreparedPrompt:
    """The prompt of a conversation whose media `prepare` makes ready for their towers:
    rendered by the chat template, each medium's soft tokens placed."""
    rendered, media = media_parts(messages)
    ids = tokenizer.encode_chat(rendered, add_generation_prompt, **template_kwargs)
    # Each kind's placeholders, in prompt order, take that kind's media in message order.
    pending = {kind: [m for m in media if m.kind is kind] for kind in (IMAGE, AUDIO)}
    places: list[tuple[int, MediaKind]] = []
    for kind, parts in pending.items():
        begin, soft, end = (tokenizer.token_id(t) for t in kind.tokens)
        if parts and (begin is None or soft is None or end is None):
            raise MediaError(
                f"the model's vocabulary has no {kind.name} tokens; it cannot take {kind.name}"
            )
        found = [k for k, token in enumerate(ids) if token == soft] if parts else []
        if len(found) != len(parts):
            raise ChatTemplateError(
                f"the rendered prompt holds {len(found)} {kind.name} placeholders for "
                f"{len(parts)} {kind.name} parts (the template must write one {kind.tokens[1]} "
                f"per {kind.name} part, and text may not)"
            )
        places += [(k, kind) for k in found]
    tokens: list[int] = []
    placed = []
    previous = 0
    for place, kind in sorted(places, key=lambda p: p[0]):
        begin, soft, end = (tokenizer.token_id(t) for t in kind.tokens)
        prepared = prepare(pending[kind].pop(0))
        tokens += ids[previous:place] + [begin]
        placed.append((len(tokens), prepared))
        tokens += [soft] * prepared.n_tokens + [end]
        previous = place + 1
    tokens += ids[previous:]
    return PreparedPrompt(np.asarray(tokens, dtype=np.int32), tuple(placed))


def prepare_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    prepare: Callable[[MediaPart], PreparedMedia],
    encode: Callable[[PreparedMedia], np.ndarray],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> Prompt:
    """The prompt of a conversation whose media `prepare` makes ready for their towers and
    `encode` turns into embeddings."""
    chat = prepare_chat(tokenizer, messages, prepare, add_generation_prompt, **template_kwargs)
    return chat.encoded(encode)
