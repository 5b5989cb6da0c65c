"""A tiny Gemma 4 model with random weights, for trying the engine without a real model.

The model (`MODEL_SHAPES["demo"]` in shapes.py) is shaped like the E2B/E4B family in
miniature: per-layer embeddings, KV sharing in the last two layers, sliding-window and full
attention layers with different head sizes, proportional RoPE on the full layers, double-width
MLPs in the KV-sharing layers and a final logit softcap. Its output is noise, but it exercises
every code path of an E-style model. It carries a small byte-fallback BPE vocabulary and a
Gemma 4 chat template, so that a tokenizer and chat formatting can run on it too.

The file is generated on first use into a cache directory and is the same, byte for byte,
every time it is generated.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType

from pygemma4.models.file_cache import cache_root, cached_file
from pygemma4.models.gguf_writer import (
    RandomWeights,
    model_metadata,
    model_tensors,
    write_model_file,
)
from pygemma4.models.shapes import MODEL_SHAPES
from pygemma4.models.vocabulary import Vocabulary, learned_vocabulary

__all__ = ["DEMO_SHAPE", "demo_model_path", "demo_vocabulary", "write_demo_model"]

T = GGMLQuantizationType

# Bump when the generated file changes, so that stale cached copies are not used.
DEMO_FILE_NAME = "pygemma4-demo-v1.gguf"
SEED = 4
DEMO_SHAPE = MODEL_SHAPES["demo"]
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

# The demo file's metadata keys in the order its first generator wrote them, which is not the
# order of llama.cpp's converter (model_metadata's): kept, so that the file stays the same bytes.
# fmt: off
_KEY_ORDER = (
    "general.name", "general.quantization_version",
    "gemma4.block_count", "gemma4.context_length", "gemma4.embedding_length",
    "gemma4.feed_forward_length", "gemma4.attention.head_count", "gemma4.attention.head_count_kv",
    "gemma4.attention.key_length", "gemma4.attention.value_length",
    "gemma4.attention.key_length_swa", "gemma4.attention.value_length_swa",
    "gemma4.attention.layer_norm_rms_epsilon", "gemma4.attention.sliding_window",
    "gemma4.attention.sliding_window_pattern", "gemma4.attention.shared_kv_layers",
    "gemma4.rope.freq_base", "gemma4.rope.freq_base_swa",
    "gemma4.rope.dimension_count", "gemma4.rope.dimension_count_swa",
    "gemma4.final_logit_softcapping", "gemma4.embedding_length_per_layer_input",
    "tokenizer.ggml.model", "tokenizer.ggml.tokens", "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id", "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id", "tokenizer.ggml.add_bos_token", "tokenizer.chat_template",
)
# A layer's tensors in the order a forward pass uses them, which is the demo file's order.
_FORWARD_ORDER = (
    "attn_norm", "attn_q", "attn_q_norm", "attn_k", "attn_k_norm", "attn_v", "attn_output",
    "post_attention_norm", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down", "post_ffw_norm",
    "inp_gate", "proj", "post_norm", "layer_output_scale",
)
# fmt: on
# The matrices the demo holds in F16; every other matrix is Q8_0, every vector F32.
_F16_MATRICES = ("attn_k", "attn_v", "inp_gate", "proj", "per_layer_model_proj")
# Matrices quantized from random values; norms drawn in float32.
_WEIGHTS = RandomWeights(quantize_values=True, norm_dtype=np.float32)


def demo_model_path() -> Path:
    """The path of the demo model, generating it into the cache directory on first use.

    The cache directory is $PYGEMMA4_CACHE, or ~/.cache/pygemma4 where that is not set. The
    file is written under a temporary name and then renamed into place, so processes that race
    to create it each see either no file or a complete one.
    """
    return cached_file(cache_root() / DEMO_FILE_NAME, write_demo_model)


def demo_vocabulary() -> Vocabulary:
    """The demo's vocabulary: N_MERGES merges learned from a page of plain English."""
    return learned_vocabulary(_MERGE_TEXT, N_MERGES)


def write_demo_model(path: Path) -> None:
    """Write the demo model to `path` (the same bytes every time)."""
    metadata = model_metadata(
        DEMO_SHAPE,
        general_name="pygemma4-demo",
        vocabulary=demo_vocabulary(),
        chat_template=CHAT_TEMPLATE,
    )
    tensors = model_tensors(DEMO_SHAPE, _tensor_types, _forward_order)
    ordered = {key: metadata[key] for key in _KEY_ORDER}
    write_model_file(path, DEMO_SHAPE, ordered, tensors, _WEIGHTS, SEED)


def _layer_and_kind(name: str) -> tuple[int, str]:
    """("blk.3.attn_q.weight") -> (3, "attn_q"); tensors outside the layers have layer -1."""
    parts = name.split(".")
    if parts[0] == "blk":
        return int(parts[1]), parts[2]
    return -1, parts[0]


def _forward_order(name: str) -> tuple[int, int]:
    layer, kind = _layer_and_kind(name)
    return layer, (_FORWARD_ORDER.index(kind) if layer >= 0 else 0)


def _tensor_types(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, GGMLQuantizationType]:
    def type_of(name: str, ne: tuple[int, ...]) -> GGMLQuantizationType:
        if len(ne) == 1:
            return T.F32
        return T.F16 if _layer_and_kind(name)[1] in _F16_MATRICES else T.Q8_0

    return {name: type_of(name, ne) for name, ne in shapes.items()}
