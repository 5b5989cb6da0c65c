"""A tiny Gemma 4 model with random weights, for trying the engine without a real model.

The model is shaped like the E2B/E4B family in miniature: per-layer embeddings, KV sharing in
the last two layers, sliding-window and full attention layers with different head sizes,
proportional RoPE on the full layers, double-width MLPs in the KV-sharing layers and a final
logit softcap. Its output is noise, but it exercises every code path of an E-style model. It
carries a small byte-fallback BPE vocabulary and a Gemma 4 chat template, so that a tokenizer
and chat formatting can run on it too.

The file is generated on first use into a cache directory and is the same, byte for byte,
every time it is generated.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType, GGUFWriter, TokenType
from gguf.quants import quantize

from pygemma4.config import ARCH
from pygemma4.models.file_cache import cache_root, cached_file

__all__ = ["DEMO_SHAPE", "ModelShape", "demo_model_path", "write_random_model"]

# Bump when the generated file changes, so that stale cached copies are not used.
DEMO_FILE_NAME = "pygemma4-demo-v1.gguf"
SEED = 4

# Tokens, scores, token types and merges.
Vocabulary = tuple[list[str], list[float], list[int], list[str]]


@dataclass(frozen=True)
class ModelShape:
    """The hyper-parameters of a random Gemma 4 model written by `write_random_model`."""

    n_layer: int = 8
    n_embd: int = 256
    n_embd_per_layer: int = 16
    n_head: int = 4
    n_head_kv: int = 2
    head_dim_swa: int = 32
    head_dim_full: int = 64
    n_ff: int = 256  # doubled in the KV-sharing layers
    n_shared_kv: int = 2
    sliding: tuple[bool, ...] = (True, True, True, True, True, False, True, False)
    sliding_window: int = 16


DEMO_SHAPE = ModelShape()
CONTEXT_LENGTH = 4096
ROPE_BASE_FULL = 1_000_000.0
ROPE_BASE_SWA = 10_000.0
ROPE_PARTIAL_FRACTION = 4  # the first 1/4 of the full layers' rotary pairs rotate
RMS_EPS = 1e-6
SOFTCAP = 30.0

SPECIAL_TOKENS = ("<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<|turn>", "<turn|>")
PAD_ID, EOS_ID, BOS_ID, UNK_ID = 0, 1, 2, 3
SPACE = "\u2581"  # how the vocabulary spells a space
# Printable ASCII, a space and a newline: one token each, after the byte tokens.
CHARACTERS = (*(chr(c) for c in range(0x21, 0x7F)), SPACE, "\n")
N_MERGES = 320
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|turn>' + ('model' if message['role'] == 'assistant' else message['role']) + '\\n'"
    " + message['content'] + '<turn|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|turn>model\\n' }}{% endif %}"
)

# The merges are learned from this text (spaces become SPACE, and merges may cross them).
_MERGE_TEXT = """
The small model in this file was made for tests and for trying out the engine. It has not
learned anything, so what it writes is only noise, but every part of the model is there: the
embeddings, the attention layers, the feed forward layers and the final norm. When you want
real text, point the engine at a real model file instead.
A language model reads a text as a list of tokens. Each token is a short piece of text, such as
a letter, a part of a word, a whole word, or a word with the space in front of it. The model
then computes, for each position in the text, how likely each token in the vocabulary is to come
next. To write new text, the engine picks a token, adds it to the end of the text, and asks the
model again. This is repeated until the text is long enough or the model writes the end token.
The tokens of this vocabulary were found by counting which pairs of pieces are the most common in
this very text, and then joining the most common pair into a new piece, again and again. That is
why the words that appear here often, like the, model, text, token and engine, become single
tokens, while rare words are written with several smaller pieces. Any byte that is not in the
vocabulary at all can still be written with one of the two hundred and fifty six byte tokens.
People often ask what the weather will be like tomorrow, whether the train is on time, or how to
cook rice so that it is soft but not wet. They ask about history, about numbers, about music and
about the names of the stars. A good answer is short when the question is simple, and careful
when the question is hard. It should say what it does not know, and it should never make up a
fact. It is better to write that you are not sure than to write something that is wrong.
In the morning the sun came up over the hills, and the light fell on the water of the lake. The
birds were singing in the trees, and a cold wind moved through the grass. Later in the day the
clouds came in from the west, and by the evening it was raining on the roofs of the town.
The people of the town went home early that evening. Some of them cooked a warm dinner, some of
them read a book by the window, and some of them went to bed to listen to the rain. The children
wanted to play outside in the water, but their mother said that it was too cold and too late.
When the rain stopped in the night, the town was quiet, and the only sound was the water running
down the street to the river. In the morning the air was clean and the sky was blue again.
To use the engine, open a model file, turn the text of a question into tokens, and ask the engine
for the next token again and again. The engine keeps what it has computed for the tokens it has
already seen, so that each new token costs only a little more work. The tokens it writes are then
turned back into text. When many people ask questions at the same time, the engine works on all of
their questions together, which is much faster than answering them one after the other.
"""


def demo_model_path() -> Path:
    """The path of the demo model, generating it into the cache directory on first use.

    The cache directory is $PYGEMMA4_CACHE, or ~/.cache/pygemma4 where that is not set. The
    file is written under a temporary name and then renamed into place, so processes that race
    to create it each see either no file or a complete one.
    """
    return cached_file(
        cache_root() / DEMO_FILE_NAME, lambda tmp: write_random_model(tmp, DEMO_SHAPE)
    )


# -- vocabulary --------------------------------------------------------------------------------


def _learn_merges(text: str, n_merges: int) -> list[tuple[str, str]]:
    """Byte-pair merges learned from `text`: the most frequent adjacent pair first, ties broken
    by the pair's spelling, stopping early when no pair occurs twice."""
    symbols = list(text)
    merges: list[tuple[str, str]] = []
    while len(merges) < n_merges:
        counts = Counter(zip(symbols, symbols[1:], strict=False))
        if not counts:
            break
        pair, count = min(counts.items(), key=lambda item: (-item[1], item[0]))
        if count < 2:
            break
        merges.append(pair)
        merged: list[str] = []
        i = 0
        while i < len(symbols):
            if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == pair:
                merged.append(pair[0] + pair[1])
                i += 2
            else:
                merged.append(symbols[i])
                i += 1
        symbols = merged
    return merges


def base_vocabulary() -> tuple[list[str], list[int]]:
    """The tokens a random model's vocabulary starts with, and their token types: the special
    tokens (SPECIAL_TOKENS, control tokens), the 256 byte tokens, then CHARACTERS."""
    tokens = [*SPECIAL_TOKENS, *(f"<0x{b:02X}>" for b in range(256)), *CHARACTERS]
    types = [int(TokenType.CONTROL)] * len(SPECIAL_TOKENS)
    types += [int(TokenType.BYTE)] * 256 + [int(TokenType.NORMAL)] * len(CHARACTERS)
    return tokens, types


def _vocabulary() -> Vocabulary:
    """Tokens, scores, token types and merges of the demo vocabulary."""
    text = SPACE.join(_MERGE_TEXT.split())
    tokens, types = base_vocabulary()
    scores = [0.0] * len(tokens)
    known = set(tokens)
    merges = _learn_merges(text, N_MERGES)
    for rank, (left, right) in enumerate(merges):
        piece = left + right
        if piece not in known:
            known.add(piece)
            tokens.append(piece)
            types.append(int(TokenType.NORMAL))
            scores.append(-float(rank + 1))
    return tokens, scores, types, [f"{a} {b}" for a, b in merges]


def add_tokenizer_metadata(writer: GGUFWriter, vocabulary: Vocabulary) -> None:
    """Add a vocabulary (tokens, scores, token types, merges) to `writer` as the metadata of a
    Gemma 4 BPE tokenizer, with the special token ids of SPECIAL_TOKENS."""
    tokens, scores, token_types, merges = vocabulary
    writer.add_string("tokenizer.ggml.model", "gemma4")
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores)
    writer.add_array("tokenizer.ggml.token_type", token_types)
    writer.add_array("tokenizer.ggml.merges", merges)
    writer.add_uint32("tokenizer.ggml.bos_token_id", BOS_ID)
    writer.add_uint32("tokenizer.ggml.eos_token_id", EOS_ID)
    writer.add_uint32("tokenizer.ggml.unknown_token_id", UNK_ID)
    writer.add_uint32("tokenizer.ggml.padding_token_id", PAD_ID)


# -- weights -----------------------------------------------------------------------------------


class _Weights:
    """Random tensors in GGUF ne order, drawn from one seeded generator in a fixed order."""

    def __init__(self, writer: GGUFWriter, seed: int, float_matrices: bool) -> None:
        self.writer = writer
        self.rng = np.random.default_rng(seed)
        self.float_matrices = float_matrices

    def _values(self, ne: tuple[int, ...], scale: float) -> np.ndarray:
        shape = tuple(reversed(ne))
        return self.rng.standard_normal(shape, dtype=np.float32) * np.float32(scale)

    def q8_0(self, name: str, ne: tuple[int, ...]) -> None:
        data = self._values(ne, 1.0 / np.sqrt(ne[0]))
        if self.float_matrices:
            self.writer.add_tensor(name, data)
            return
        quantized = quantize(data, GGMLQuantizationType.Q8_0)
        self.writer.add_tensor(name, quantized, raw_dtype=GGMLQuantizationType.Q8_0)

    def f16(self, name: str, ne: tuple[int, ...]) -> None:
        data = self._values(ne, 1.0 / np.sqrt(ne[0]))
        self.writer.add_tensor(name, data if self.float_matrices else data.astype(np.float16))

    def norm(self, name: str, n: int) -> None:
        self.writer.add_tensor(name, 1.0 + self._values((n,), 0.1))

    def scale(self, name: str) -> None:
        self.writer.add_tensor(name, self.rng.uniform(0.5, 1.0, size=1).astype(np.float32))

    def exact(self, name: str, values: np.ndarray) -> None:
        self.writer.add_tensor(name, values.astype(np.float32))


def write_random_model(
    path: Path, shape: ModelShape = DEMO_SHAPE, seed: int = SEED, float_matrices: bool = False
) -> None:
    """Write a Gemma 4 GGUF of `shape` with random weights drawn from `seed`.

    Matrices are Q8_0 and F16 as in the demo model, or all F32 with float_matrices (to be
    quantized afterwards, e.g. by llama.cpp's quantizer, into any type mix).
    """
    if len(shape.sliding) != shape.n_layer:
        raise ValueError("the sliding-window pattern needs one entry per layer")
    vocabulary = _vocabulary()
    vocab = len(vocabulary[0])
    n_ff = [
        shape.n_ff * 2 if il >= shape.n_layer - shape.n_shared_kv else shape.n_ff
        for il in range(shape.n_layer)
    ]

    writer = GGUFWriter(path, ARCH)
    a = f"{ARCH}."
    writer.add_string("general.name", "pygemma4-demo")
    writer.add_uint32("general.quantization_version", 2)
    writer.add_uint32(a + "block_count", shape.n_layer)
    writer.add_uint32(a + "context_length", CONTEXT_LENGTH)
    writer.add_uint32(a + "embedding_length", shape.n_embd)
    writer.add_array(a + "feed_forward_length", n_ff)
    writer.add_uint32(a + "attention.head_count", shape.n_head)
    writer.add_uint32(a + "attention.head_count_kv", shape.n_head_kv)
    writer.add_uint32(a + "attention.key_length", shape.head_dim_full)
    writer.add_uint32(a + "attention.value_length", shape.head_dim_full)
    writer.add_uint32(a + "attention.key_length_swa", shape.head_dim_swa)
    writer.add_uint32(a + "attention.value_length_swa", shape.head_dim_swa)
    writer.add_float32(a + "attention.layer_norm_rms_epsilon", RMS_EPS)
    writer.add_uint32(a + "attention.sliding_window", shape.sliding_window)
    writer.add_array(a + "attention.sliding_window_pattern", list(shape.sliding))
    writer.add_uint32(a + "attention.shared_kv_layers", shape.n_shared_kv)
    writer.add_float32(a + "rope.freq_base", ROPE_BASE_FULL)
    writer.add_float32(a + "rope.freq_base_swa", ROPE_BASE_SWA)
    writer.add_uint32(a + "rope.dimension_count", shape.head_dim_full)
    writer.add_uint32(a + "rope.dimension_count_swa", shape.head_dim_swa)
    writer.add_float32(a + "final_logit_softcapping", SOFTCAP)
    writer.add_uint32(a + "embedding_length_per_layer_input", shape.n_embd_per_layer)
    add_tokenizer_metadata(writer, vocabulary)
    writer.add_bool("tokenizer.ggml.add_bos_token", True)
    writer.add_string("tokenizer.chat_template", CHAT_TEMPLATE)

    w = _Weights(writer, seed, float_matrices)
    E, P = shape.n_embd, shape.n_embd_per_layer
    w.q8_0("token_embd.weight", (E, vocab))
    w.norm("output_norm.weight", E)
    n_pairs = shape.head_dim_full // 2
    rope_freqs = np.full(n_pairs, 1e30, dtype=np.float32)
    rope_freqs[: n_pairs // ROPE_PARTIAL_FRACTION] = 1.0
    w.exact("rope_freqs.weight", rope_freqs)
    w.q8_0("per_layer_token_embd.weight", (P * shape.n_layer, vocab))
    w.f16("per_layer_model_proj.weight", (E, P * shape.n_layer))
    w.norm("per_layer_proj_norm.weight", P)
    for il in range(shape.n_layer):
        b = f"blk.{il}."
        hd = shape.head_dim_swa if shape.sliding[il] else shape.head_dim_full
        w.norm(b + "attn_norm.weight", E)
        w.q8_0(b + "attn_q.weight", (E, shape.n_head * hd))
        w.norm(b + "attn_q_norm.weight", hd)
        if il < shape.n_layer - shape.n_shared_kv:
            w.f16(b + "attn_k.weight", (E, shape.n_head_kv * hd))
            w.norm(b + "attn_k_norm.weight", hd)
            w.f16(b + "attn_v.weight", (E, shape.n_head_kv * hd))
        w.q8_0(b + "attn_output.weight", (shape.n_head * hd, E))
        w.norm(b + "post_attention_norm.weight", E)
        w.norm(b + "ffn_norm.weight", E)
        w.q8_0(b + "ffn_gate.weight", (E, n_ff[il]))
        w.q8_0(b + "ffn_up.weight", (E, n_ff[il]))
        w.q8_0(b + "ffn_down.weight", (n_ff[il], E))
        w.norm(b + "post_ffw_norm.weight", E)
        w.f16(b + "inp_gate.weight", (E, P))
        w.f16(b + "proj.weight", (P, E))
        w.norm(b + "post_norm.weight", E)
        w.scale(b + "layer_output_scale.weight")

    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
