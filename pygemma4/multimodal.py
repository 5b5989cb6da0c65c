"""Multimodal prompts: chat messages with image parts, rendered by the model's chat template,
each image's placeholder expanded into its soft tokens and paired with its embeddings.

An image part is `{"type": "image", "image": <path | bytes | PIL image | array>}` (or `"url"` /
`"path"` in place of `"image"`), or OpenAI's `{"type": "image_url", "image_url": {"url":
"data:image/png;base64,..."}}`. The template writes one `<|image|>` per image; like the model's
processor, the prompt puts `<|image>`, one `<|image|>` per soft token, and `<image|>` in its
place. The model sees the image's embeddings at those soft tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import ChatTemplateError, MediaError
from .media.image import ImageInput
from .prefix_cache import MediaKey
from .runner import Embeddings
from .tokenizer import Tokenizer

__all__ = ["IMAGE_TOKENS", "PlacedMedia", "Prompt", "image_parts", "prepare_prompt"]

# The special tokens of an image: begin, one per soft token, end.
IMAGE_TOKENS = ("<|image>", "<|image|>", "<image|>")


@dataclass(frozen=True)
class PlacedMedia:
    """One image in a prompt: its soft tokens start at `offset`; `embeddings` float32
    [n, n_embd] replace them; `digest` names its content."""

    offset: int
    embeddings: np.ndarray
    digest: str

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
        ids = self.token_ids.astype(np.int32, copy=True)
        for m in self.media:
            ids[m.offset : m.offset + m.length] = pad_id
        return ids

    def embeddings(self) -> Embeddings | None:
        """The rows the media's embeddings replace, for a feed of the whole prompt."""
        if not self.media:
            return None
        offsets = np.concatenate(
            [np.arange(m.offset, m.offset + m.length, dtype=np.int32) for m in self.media]
        )
        return Embeddings(offsets, np.concatenate([m.embeddings for m in self.media]))

    def media_keys(self) -> tuple[MediaKey, ...]:
        """What the prefix cache names the media's positions by (their content)."""
        return tuple(MediaKey(m.offset, m.length, m.digest) for m in self.media)


def image_parts(messages: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list]:
    """The messages with every image part reduced to `{"type": "image"}` (what the chat
    template renders), and the images in the order they appear."""
    if isinstance(messages, (str, bytes)) or not isinstance(messages, Sequence):
        raise ChatTemplateError("messages must be a list of mappings")
    images: list[ImageInput] = []
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
                images.append(_image_source(part, ("image", "url", "path"), i, j))
                parts.append({"type": "image"})
            elif kind == "image_url":
                url = part.get("image_url")
                source = url.get("url") if isinstance(url, Mapping) else url
                images.append(_image_source({"url": source}, ("url",), i, j))
                parts.append({"type": "image"})
            else:
                parts.append(part)
        rendered.append({**message, "content": parts})
    return rendered, images


def _image_source(part: Mapping[str, Any], keys: tuple[str, ...], i: int, j: int) -> ImageInput:
    for key in keys:
        if part.get(key) is not None:
            source: ImageInput = part[key]
            return source
    raise MediaError(f"message {i} content part {j}: an image part needs one of {', '.join(keys)}")


def prepare_prompt(
    tokenizer: Tokenizer,
    messages: Sequence[Mapping[str, Any]],
    embed: Callable[[ImageInput], tuple[np.ndarray, str]],
    add_generation_prompt: bool = True,
    **template_kwargs: Any,
) -> Prompt:
    """The prompt of a conversation whose images `embed` turns into (embeddings, digest)."""
    rendered, images = image_parts(messages)
    ids = tokenizer.encode_chat(rendered, add_generation_prompt, **template_kwargs)
    boi, soft, eoi = (tokenizer.token_id(t) for t in IMAGE_TOKENS)
    if images and (boi is None or soft is None or eoi is None):
        raise MediaError("the model's vocabulary has no image tokens; it cannot take images")
    places = [k for k, token in enumerate(ids) if token == soft] if images else []
    if len(places) != len(images):
        raise ChatTemplateError(
            f"the rendered prompt holds {len(places)} image placeholders for {len(images)} "
            "images (the template must write one <|image|> per image part, and text may not)"
        )
    tokens: list[int] = []
    media = []
    previous = 0
    for place, image in zip(places, images, strict=True):
        embeddings, digest = embed(image)
        tokens += ids[previous:place] + [boi]
        media.append(PlacedMedia(len(tokens), embeddings, digest))
        tokens += [soft] * len(embeddings) + [eoi]
        previous = place + 1
    tokens += ids[previous:]
    return Prompt(np.asarray(tokens, dtype=np.int32), tuple(media))
