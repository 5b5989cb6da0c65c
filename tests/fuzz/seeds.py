"""Write the fuzz targets' seed inputs into corpus/<target>/seed-*: small valid inputs of every
kind each target takes, from which fuzzing mutates. The seeds are committed; run this again
(`PYTHONPATH=. python tests/fuzz/seeds.py`) after a change to what a target's input means.
Inputs found by fuzzing that once failed are kept beside them as regression-*.
"""

from __future__ import annotations

import json
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path

import msgspec
import numpy as np
from gguf import GGMLQuantizationType, GGUFValueType, GGUFWriter
from harness import corpus_dir

from pygemma4 import protocol
from pygemma4.chat import GEMMA4_TEMPLATE
from pygemma4.chat_output import CALL_CLOSE, CALL_OPEN, CHANNEL_CLOSE, CHANNEL_OPEN, QUOTE
from pygemma4.models.demo import CHAT_TEMPLATE, demo_vocabulary
from pygemma4.models.gguf_writer import (
    RandomWeights,
    model_metadata,
    model_tensors,
    write_model_file,
)
from pygemma4.models.shapes import ModelShape
from pygemma4.models.vocabulary import MIN_VOCAB, enumerated_vocabulary, tokenizer_metadata
from pygemma4.sampling import SamplingParams

T = GGMLQuantizationType
TEMPLATES = Path(__file__).resolve().parents[3] / "shared" / "templates"
VOCAB = MIN_VOCAB + 9  # the smallest enumerated vocabulary with merges
SMALL = {
    "n_embd": 32,
    "n_head": 1,
    "n_head_kv_swa": 1,
    "n_head_kv_full": 1,
    "head_dim_swa": 32,
    "head_dim_full": 32,
    "n_ff": 32,
    "sliding_period": 2,
    "sliding_window": 4,
    "context_length": 64,
    "vocab_size": VOCAB,
}
# Tiny models of each family: dense; E-style (per-layer embeddings, shared KV, double-wide MLPs);
# a mixture of experts with K = V on the full layers.
SHAPES = {
    "dense": ModelShape(name="fuzz-dense", n_layer=2, **SMALL),
    "e": ModelShape(
        name="fuzz-e",
        n_layer=4,
        n_embd_per_layer=8,
        n_shared_kv=2,
        double_wide_mlp=True,
        **SMALL,
    ),
    "moe": ModelShape(
        name="fuzz-moe",
        n_layer=2,
        n_expert=4,
        n_expert_used=2,
        n_ff_expert=32,
        full_has_v=False,
        **SMALL,
    ),
}
WEIGHTS = RandomWeights(quantize_values=True, norm_dtype=np.float32)
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {
                    "city": {"type": "string", "maxLength": 20},
                    "days": {"type": "integer"},
                    "units": {"type": "string", "enum": ["c", "f"]},
                    "hours": {"type": "array", "items": {"type": "number"}, "maxItems": 3},
                },
                "required": ["city", "days"],
            },
        },
    }
]
MESSAGES = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": [{"type": "text", "text": "Weather in Paris?"}]},
    {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
        ],
    },
    {"role": "tool", "tool_call_id": "call_1", "content": '{"sky": "blue"}'},
    {"role": "assistant", "content": "Sunny.", "reasoning_content": "It said blue."},
    {"role": "user", "content": "Thanks <|turn> \u2581 \U0001f642"},
]
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "tags": {"type": "array", "items": {"enum": [1, 2]}},
    },
    "required": ["name"],
}


def model_file(shape: ModelShape) -> bytes:
    """A model file of `shape` (Q4_0 matrices, F32 vectors), with the demo's chat template."""
    metadata = model_metadata(
        shape,
        general_name=shape.name,
        vocabulary=enumerated_vocabulary(shape.vocab_size),
        chat_template=CHAT_TEMPLATE,
    )
    tensors = model_tensors(shape, _small_types, lambda name: name)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model.gguf"
        write_model_file(path, shape, metadata, tensors, WEIGHTS, seed=1)
        return path.read_bytes()


def _small_types(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, GGMLQuantizationType]:
    return {
        name: T.Q4_0 if len(ne) > 1 and ne[0] % 32 == 0 else T.F32 for name, ne in shapes.items()
    }


def tokenizer_file(metadata: Mapping[str, object]) -> bytes:
    """A GGUF holding only `metadata` (no tensors)."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "tokenizer.gguf"
        writer = GGUFWriter(path, "gemma4")
        for key, value in metadata.items():
            writer.add_key_value(key, value, _value_type(value))
        writer.write_header_to_file(path)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        writer.close()
        return path.read_bytes()


def _value_type(value: object) -> GGUFValueType:
    if isinstance(value, str):
        return GGUFValueType.STRING
    if isinstance(value, int):
        return GGUFValueType.UINT32
    return GGUFValueType.ARRAY


def seeds() -> dict[str, dict[str, bytes]]:
    """Every target's seeds by name."""
    demo = tokenizer_metadata(demo_vocabulary())
    small = tokenizer_metadata(enumerated_vocabulary(VOCAB))
    google = sorted(TEMPLATES.glob("gemma4-*.jinja"))
    frame = protocol.encode
    sampling = protocol.wire_sampling(SamplingParams(temperature=0.7, top_k=5, stop=("\n\n",)))
    chat = protocol.Chat(
        id=7,
        messages=msgspec.convert(MESSAGES, list[protocol.ChatMessage]),
        tools=msgspec.convert(TOOLS, list[protocol.ToolDefinition]),
        chat_template_kwargs={"enable_thinking": True},
        sampling=sampling,
        stream=True,
        max_tokens=16,
    )
    # Templates take a call's content as "" (the tokenizer worker's reading of None).
    rendered = [{**m, "content": "" if m["content"] is None else m["content"]} for m in MESSAGES]
    render_input = json.dumps({"messages": rendered, "kwargs": {"tools": TOOLS}}).encode()
    return {
        "gguf": {f"seed-{name}.gguf": model_file(shape) for name, shape in SHAPES.items()},
        "tokenizer_metadata": {
            "seed-demo.gguf": tokenizer_file({**demo, "tokenizer.chat_template": CHAT_TEMPLATE}),
            "seed-small.gguf": tokenizer_file(small),
        },
        "tokenizer_text": {
            "seed-text": b"\x00Hello world, the model writes text.\n\n\nEnd",
            "seed-special": b"\x0aA <|turn>user\nhi<turn|>\n<bos>\xe2\x96\x81 \xf0\x9f\x99\x82",
            "seed-invalid-utf8": b"\x02abc\xff\xfe def",
            "seed-ids": b"\x01" + np.array([2, 5, 300, 7, 1, 400], dtype="<i4").tobytes(),
            "seed-ids-skip": b"\x05" + np.array([2, 1, 6, 40, 41], dtype="<i4").tobytes(),
        },
        "chat_template": {
            "seed-demo": CHAT_TEMPLATE.encode() + b"\0" + render_input,
            "seed-builtin": GEMMA4_TEMPLATE.encode() + b"\0" + render_input,
            "seed-plain-text": CHAT_TEMPLATE.encode() + b"\0Hello there",
            "seed-escape": b"{{ ''.__class__.__mro__[1].__subclasses__() }}\0hi",
            "seed-loops": b"{% for i in range(300) %}{% for j in range(300) %}.{% endfor %}"
            b"{% endfor %}\0hi",
            **{f"seed-{p.stem}": p.read_bytes() + b"\0" + render_input for p in google[-1:]},
        },
        "protocol": {
            "seed-completion": b"\0"
            + frame(protocol.Completion(id=1, prompt="Hello", sampling=sampling, max_tokens=8)),
            "seed-completion-ids": b"\0" + frame(protocol.Completion(id=2, prompt=[2, 5, 6])),
            "seed-chat": b"\0" + frame(chat),
            "seed-cancel": b"\0" + frame(protocol.Cancel(id=3)),
            "seed-health": b"\0" + frame(protocol.Health(id=4)),
            "seed-chunk": b"\1"
            + frame(protocol.Chunk(id=5, text="hi", token_ids=[5], in_reasoning=False)),
            "seed-error": b"\1" + frame(protocol.Error(id=6, code="bad_request", message="no")),
            "seed-ended": b"\3" + frame(protocol.EndedRequests(rids=[1, 2])),
        },
        "openai_request": {
            "seed-chat": b"\0"
            + json.dumps(
                {
                    "model": "m",
                    "messages": MESSAGES,
                    "tools": TOOLS,
                    "tool_choice": "required",
                    "temperature": 0.5,
                    "stop": ["x"],
                    "logprobs": True,
                    "top_logprobs": 2,
                    "max_completion_tokens": 8,
                }
            ).encode(),
            "seed-chat-schema": b"\0"
            + json.dumps(
                {
                    "model": "m",
                    "messages": [{"role": "user", "content": "hi"}],
                    "response_format": {
                        "type": "json_schema",
                        "json_schema": {"name": "s", "schema": SCHEMA},
                    },
                    "stream": True,
                    "stream_options": {"include_usage": True},
                }
            ).encode(),
            "seed-completions": b"\1"
            + json.dumps(
                {"model": "m", "prompt": ["Hello", [2, 5, 6]], "n": 2, "seed": 3, "logprobs": 1}
            ).encode(),
        },
        "chat_output": {
            "seed-reasoning": b"\0"
            + f"{CHANNEL_OPEN}thought\nLet me think.{CHANNEL_CLOSE}The answer is 4.".encode(),
            "seed-call": b"\x02"
            + f"Checking. {CALL_OPEN}call:get_weather{{city:{QUOTE}Paris{QUOTE},days:3,"
            f"hours:[1,2.5],deep:{{ok:true,none:null}}}}{CALL_CLOSE}<|tool_response>".encode(),
            "seed-broken-call": b"\x07" + f"{CALL_OPEN}call:f{{a:[1,{{b:{QUOTE}x".encode(),
            "seed-in-reasoning": b"\x01still thinking<channel|>done",
        },
        "constraints": {
            "seed-schema": b"\0" + json.dumps(SCHEMA).encode(),
            "seed-tools": b"\1" + json.dumps(TOOLS).encode(),
            "seed-tool-named": b"\2" + json.dumps(TOOLS).encode(),
            "seed-lark": b'\3start: "yes" | "no" | /[0-9]{1,3}/',
        },
    }


def main() -> None:
    for target, files in seeds().items():
        folder = corpus_dir(target)
        folder.mkdir(parents=True, exist_ok=True)
        for name, data in files.items():
            (folder / name).write_bytes(data)
            print(f"{folder / name}: {len(data)} bytes", file=sys.stderr)


if __name__ == "__main__":
    main()
