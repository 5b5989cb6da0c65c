"""Text to token ids and back, from the tokenizer a Gemma 4 GGUF carries.

Gemma 4 files describe their tokenizer as `tokenizer.ggml.model = "gemma4"`: BPE over raw UTF-8
characters with the merges of `tokenizer.ggml.merges`, spaces escaped to U+2581 before merging,
the text split only where runs of newlines begin and end, and `<0xXX>` byte tokens for
characters the vocabulary lacks. Encoding follows llama.cpp's reading of that description token
for token, so prompts reach the model exactly as llama.cpp would feed them; the merges
themselves run in the `tokenizers` library.
"""

from __future__ import annotations

import codecs
import numbers
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from tokenizers import Tokenizer as _BPETokenizer
from tokenizers.models import BPE

from pygemma4.chat import GEMMA4_TEMPLATE, ChatTemplate
from pygemma4.errors import TokenizerError, located
from pygemma4.gguf_file import read_gguf

TOKENIZER_MODEL = "gemma4"
SPACE_ESCAPE = "\u2581"

# Token types of `tokenizer.ggml.token_type` (llama.cpp's numbering).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
# Tokens whose text is recognised inside input text instead of being tokenized.
_SPECIAL_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)
# Special tokens decode as their text, unless the caller asks to leave them out.
_SKIPPABLE_TYPES = (UNKNOWN, CONTROL)

# Token texts that end a model turn in Gemma 4 vocabularies, beside the ids metadata names.
END_OF_TURN_TEXTS = ("<turn|>",)
_END_TOKEN_ID_KEYS = (
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.eot_token_id",
    "tokenizer.ggml.eom_token_id",
)

_NEWLINE_RUNS = re.compile(r"(\n+)")
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def carries_tokenizer(metadata: Mapping[str, Any]) -> bool:
    """Whether GGUF metadata describes a tokenizer (files of bare weights may not)."""
    return "tokenizer.ggml.tokens" in metadata


class Tokenizer:
    """A Gemma 4 tokenizer: `encode` text to ids, `decode` ids to text, render chats."""

    def __init__(
        self,
        tokens: Sequence[str],
        token_types: Sequence[int],
        merges: Sequence[str],
        bos_id: int | None,
        eos_id: int | None,
        end_of_generation_ids: Iterable[int] = (),
        chat_template: str | None = None,
    ) -> None:
        """Build from the vocabulary as a GGUF stores it; see `from_gguf` for files."""
        if not tokens:
            raise TokenizerError("the vocabulary is empty")
        if len(token_types) != len(tokens):
            raise TokenizerError(f"{len(token_types)} token types given for {len(tokens)} tokens")
        self.tokens: tuple[str, ...] = tuple(tokens)
        self.token_types: tuple[int, ...] = tuple(int(t) for t in token_types)
        self.bos_id = _checked_id("BOS", bos_id, len(tokens))
        self.eos_id = _checked_id("EOS", eos_id, len(tokens))
        # A later duplicate of a token text wins, as in llama.cpp's text-to-id map.
        self._ids = {text: i for i, text in enumerate(self.tokens)}
        split_merges = [_split_merge(i, merge) for i, merge in enumerate(merges)]
        try:
            bpe = BPE(vocab=self._ids, merges=split_merges, byte_fallback=True, fuse_unk=False)
        except Exception as e:  # tokenizers raises a bare Exception for merges it refuses
            raise TokenizerError(f"the merges do not fit the vocabulary: {e}") from None
        self._bpe = _BPETokenizer(bpe)
        # Longest first, so a special token that contains another wins where both match.
        self._special_ids = sorted(
            (i for i, kind in enumerate(self.token_types) if kind in _SPECIAL_TYPES),
            key=lambda i: (-len(self.tokens[i]), i),
        )
        self._pieces = [self._piece(i) for i in range(len(self.tokens))]
        ends = {int(i) for i in end_of_generation_ids}
        ends.update(i for i in (self.eos_id,) if i is not None)
        ends.update(self._ids[t] for t in END_OF_TURN_TEXTS if t in self._ids)
        for i in ends:
            _checked_id("end-of-generation", i, len(tokens))
        self.end_of_generation_ids: frozenset[int] = frozenset(ends)
        self.chat_template = ChatTemplate(
            chat_template if chat_template is not None else GEMMA4_TEMPLATE,
            special_tokens=self._special_token_texts(),
        )
        self.has_own_chat_template = chat_template is not None

    @classmethod
    def from_gguf(cls, path: str | os.PathLike[str]) -> Tokenizer:
        """The tokenizer of the Gemma 4 GGUF file at `path` (nothing else is needed)."""
        gguf = read_gguf(path)
        with located(path):
            return cls.from_metadata(gguf.metadata)

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer that GGUF metadata (`tokenizer.ggml.*`, `tokenizer.chat_template`)
        describes."""
        model = metadata.get("tokenizer.ggml.model")
        if model != TOKENIZER_MODEL:
            raise TokenizerError(
                f"tokenizer.ggml.model is {model!r}; pygemma4 reads Gemma 4 tokenizers "
                f"({TOKENIZER_MODEL!r})"
            )
        tokens = _string_list(metadata, "tokenizer.ggml.tokens")
        merges = _string_list(metadata, "tokenizer.ggml.merges")
        types = metadata.get("tokenizer.ggml.token_type", [NORMAL] * len(tokens))
        if not isinstance(types, list) or not all(
            isinstance(t, int) and not isinstance(t, bool) for t in types
        ):
            raise TokenizerError("tokenizer.ggml.token_type must be a list of integers")
        ends = [_metadata_id(metadata, key) for key in _END_TOKEN_ID_KEYS]
        template = metadata.get("tokenizer.chat_template")
        if template is not None and not isinstance(template, str):
            raise TokenizerError("tokenizer.chat_template must be a string")
        return cls(
            tokens,
            types,
            merges,
            bos_id=_metadata_id(metadata, "tokenizer.ggml.bos_token_id"),
            eos_id=_metadata_id(metadata, "tokenizer.ggml.eos_token_id"),
            end_of_generation_ids=[i for i in ends if i is not None],
            chat_template=template,
        )

    @property
    def vocab_size(self) -> int:
        """Number of token ids."""
        return len(self.tokens)

    def encode(self, text: str, add_bos: bool = True, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, with BOS first when `add_bos`.

        With `parse_special`, the texts of control and user-defined tokens (`<|turn>`,
        `<turn|>`, ...) inside `text` become those tokens; without it only user-defined ones do.
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        _check_encodable(text)
        ids: list[int] = []
        if add_bos:
            if self.bos_id is None:
                raise TokenizerError("this vocabulary has no BOS token to add")
            ids.append(self.bos_id)
        words: list[str] = []
        word_slots: list[int] = []
        for fragment in self._split_special(text, parse_special):
            if isinstance(fragment, int):
                ids.append(fragment)
                continue
            for word in _NEWLINE_RUNS.split(fragment.replace(" ", SPACE_ESCAPE)):
                if not word:
                    continue
                # A run of newlines that is itself a token stays whole, whatever the merges
                # would make of it (as llama.cpp does for Gemma 4).
                whole = self._ids.get(word) if word[0] == "\n" else None
                if whole is not None:
                    ids.append(whole)
                else:
                    word_slots.append(len(ids))
                    ids.append(-1)
                    words.append(word)
        if not words:
            return ids
        merged = self._bpe.encode_batch(words, add_special_tokens=False)
        out: list[int] = []
        start = 0
        for slot, encoding in zip(word_slots, merged, strict=True):
            out.extend(ids[start:slot])
            out.extend(encoding.ids)
            start = slot + 1
        out.extend(ids[start:])
        return out

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        """The text of `ids`. A leading BOS (the one `encode` adds) is not rendered, so
        `decode(encode(s)) == s`; other control tokens render as their text unless
        `skip_special`. Bytes that do not form valid UTF-8 become U+FFFD."""
        ids = self._checked_ids(ids)
        if ids and ids[0] == self.bos_id:
            ids = ids[1:]
        return b"".join(self._bytes(i, skip_special) for i in ids).decode("utf-8", "replace")

    def token_bytes(self, token_id: int, skip_special: bool = False) -> bytes:
        """The bytes one token contributes to decoded text."""
        (token_id,) = self._checked_ids([token_id])
        return self._bytes(token_id, skip_special)

    def stream(self, skip_special: bool = False) -> DetokenizeStream:
        """An incremental decoder for ids that arrive one at a time."""
        return DetokenizeStream(self, skip_special)

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> str:
        """The prompt text for a conversation, rendered with the model's chat template (or
        the built-in Gemma 4 template where the file carries none)."""
        return self.chat_template.render(messages, add_generation_prompt, **template_kwargs)

    def token_id(self, text: str) -> int | None:
        """The id of the token whose text is `text`, if there is one."""
        return self._ids.get(text)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
        **template_kwargs: Any,
    ) -> list[int]:
        """Token ids of the rendered conversation, starting with exactly one BOS."""
        text = self.apply_chat_template(messages, add_generation_prompt, **template_kwargs)
        bos_text = self.tokens[self.bos_id] if self.bos_id is not None else None
        return self.encode(text, add_bos=bos_text is not None and not text.startswith(bos_text))

    def _split_special(self, text: str, parse_special: bool) -> list[str | int]:
        """`text` cut into plain-text pieces and the ids of special tokens found in it."""
        fragments: list[str | int] = [text]
        for special in self._special_ids:
            if not parse_special and self.token_types[special] != USER_DEFINED:
                continue
            needle = self.tokens[special]
            if not any(isinstance(f, str) and needle in f for f in fragments):
                continue
            split: list[str | int] = []
            for fragment in fragments:
                if isinstance(fragment, int) or needle not in fragment:
                    split.append(fragment)
                    continue
                for k, part in enumerate(fragment.split(needle)):
                    if k:
                        split.append(special)
                    if part:
                        split.append(part)
            fragments = split
        return fragments

    def _piece(self, token_id: int) -> bytes:
        text = self.tokens[token_id]
        kind = self.token_types[token_id]
        if kind == BYTE:
            match = _BYTE_TOKEN.fullmatch(text)
            if match is None:
                raise TokenizerError(f"byte token {token_id} is {text!r}, not of the form <0xXX>")
            return bytes([int(match.group(1), 16)])
        if kind == NORMAL:
            text = text.replace(SPACE_ESCAPE, " ")
        return text.encode("utf-8", "surrogatepass")

    def _bytes(self, token_id: int, skip_special: bool) -> bytes:
        if skip_special and self.token_types[token_id] in _SKIPPABLE_TYPES:
            return b""
        return self._pieces[token_id]

    def _checked_ids(self, ids: Iterable[int]) -> list[int]:
        checked = []
        for token_id in ids:
            if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
                raise TypeError(f"token ids must be integers, got {token_id!r}")
            if not 0 <= token_id < len(self.tokens):
                raise TokenizerError(f"token id {token_id} out of range [0, {len(self.tokens)})")
            checked.append(int(token_id))
        return checked

    def _special_token_texts(self) -> dict[str, str]:
        texts = {}
        for name, token_id in (("bos_token", self.bos_id), ("eos_token", self.eos_id)):
            if token_id is not None:
                texts[name] = self.tokens[token_id]
        return texts


class DetokenizeStream:
    """Text for token ids fed one at a time: `push` returns only whole characters, holding
    back the bytes of a character split across tokens until it is complete."""

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False) -> None:
        self._tokenizer = tokenizer
        self._skip_special = skip_special
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._started = False

    def push(self, token_id: int) -> str:
        """The text completed by `token_id` (possibly empty)."""
        piece = self._tokenizer.token_bytes(token_id, self._skip_special)
        if not self._started:
            self._started = True
            if token_id == self._tokenizer.bos_id:
                return ""
        return self._utf8.decode(piece)

    def finish(self) -> str:
        """Whatever is held back, with an incomplete character as U+FFFD."""
        return self._utf8.decode(b"", final=True)


def _split_merge(rank: int, merge: str) -> tuple[str, str]:
    # The separator is the first space after the first character: token texts hold no spaces
    # (they are escaped), but a merge of the escape character itself must still split.
    cut = merge.find(" ", 1)
    if cut <= 0 or cut == len(merge) - 1:
        raise TokenizerError(f"merge {rank} is {merge!r}, not two tokens separated by a space")
    return merge[:cut], merge[cut + 1 :]


def _string_list(metadata: Mapping[str, Any], key: str) -> list[str]:
    value = metadata.get(key)
    if value is None:
        raise TokenizerError(f"metadata key {key!r} is missing")
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise TokenizerError(f"metadata key {key!r} must be a list of strings")
    return value


def _metadata_id(metadata: Mapping[str, Any], key: str) -> int | None:
    value = metadata.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
        raise TokenizerError(f"metadata key {key!r} must be an integer, got {value!r}")
    return value


def _checked_id(what: str, token_id: int | None, n_tokens: int) -> int | None:
    if token_id is not None and not 0 <= token_id < n_tokens:
        raise TokenizerError(f"{what} token id {token_id} is outside the vocabulary of {n_tokens}")
    return token_id


def _check_encodable(text: str) -> None:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise TokenizerError(
            f"text is not valid Unicode: {e.reason} at index {e.start} ({text[e.start : e.end]!r})"
        ) from None
