"""The tokenizer against llama.cpp: the fixtures' reference token ids, and live llama-cpp-python
on a corpus of awkward strings for every vocabulary at hand; round trips and streaming."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import rewrite_gguf
from gguf import GGUFReader
from text_corpus import corpus

from pygemma4.errors import GGUFError, TokenizerError
from pygemma4.gguf_file import read_gguf
from pygemma4.tokenizer import NORMAL, Tokenizer

FIXTURE_MODELS = ["gemma4-tiny-e", "gemma4-tiny-moe"]
CORPUS = corpus()


def fixture_gguf(fixtures_dir: Path, model: str) -> Path:
    return fixtures_dir / model / "model-Q8_0.gguf"


@pytest.fixture(scope="module")
def newline_vocab_file(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e fixture with tokens for runs of 2 and 4 newlines and a merge that makes the run of
    2, as real Gemma 4 vocabularies have: a run that is a token stays whole, others merge."""
    source = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
    fields = GGUFReader(source).fields
    tokens = list(fields["tokenizer.ggml.tokens"].contents())
    types = fields["tokenizer.ggml.token_type"].contents()
    merges = list(fields["tokenizer.ggml.merges"].contents())
    in_merges = {part for merge in merges for part in merge.split(" ")}
    spare = [
        i
        for i, text in enumerate(tokens)
        if types[i] == NORMAL
        and len(text) == 1
        and text not in in_merges
        and text.isascii()
        and not text.isalnum()
        and text not in " \n\t"
    ]
    tokens[spare[0]] = "\n\n"
    tokens[spare[1]] = "\n\n\n\n"
    overrides = {"tokenizer.ggml.tokens": tokens, "tokenizer.ggml.merges": [*merges, "\n \n"]}
    target = tmp_path_factory.mktemp("newlines") / "newline-vocab.gguf"
    return rewrite_gguf(source, target, overrides)


def vocabulary(name: str, fixtures_dir: Path, demo_model_file: Path, newline_file: Path) -> Path:
    """The GGUF of one of the vocabularies the live comparison runs on."""
    if name == "demo":
        return demo_model_file
    if name == "newlines":
        return newline_file
    return fixture_gguf(fixtures_dir, f"gemma4-tiny-{name}")


@pytest.mark.parametrize("model", FIXTURE_MODELS)
def test_fixture_corpus_matches_llama_cpp(fixtures_dir: Path, model: str) -> None:
    ref = np.load(fixtures_dir / model / "llama_ref.npz")
    strings = json.loads(str(ref["corpus"]))
    tokenizer = Tokenizer.from_gguf(fixture_gguf(fixtures_dir, model))
    for j, text in enumerate(strings):
        assert tokenizer.encode(text) == ref[f"tok{j}"].tolist(), repr(text)
        assert tokenizer.decode(tokenizer.encode(text)) == text


def test_fixture_prompts_match_hugging_face_ids(fixtures_dir: Path) -> None:
    ref = np.load(fixtures_dir / "gemma4-tiny-e" / "ref.npz")
    tokenizer = Tokenizer.from_gguf(fixture_gguf(fixtures_dir, "gemma4-tiny-e"))
    for i in range(3):
        ids = ref[f"ids{i}"].tolist()
        assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_corpus_is_large_and_varied() -> None:
    assert len(CORPUS) >= 2000
    joined = "".join(CORPUS)
    for needle in ("\u200d", "\n\n\n", "   ", "\t", "\x00", "<|turn>", "<turn|>", "東", "🇫🇷"):
        assert needle in joined


@pytest.mark.parametrize("vocab", ["e", "moe", "demo", "newlines"])
@pytest.mark.parametrize("parse_special", [True, False])
def test_corpus_matches_llama_cpp_live(
    fixtures_dir: Path,
    demo_model_file: Path,
    newline_vocab_file: Path,
    vocab: str,
    parse_special: bool,
) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = vocabulary(vocab, fixtures_dir, demo_model_file, newline_vocab_file)
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    tokenizer = Tokenizer.from_gguf(path)
    mismatches = []
    for text in CORPUS:
        ours = tokenizer.encode(text, parse_special=parse_special)
        theirs = reference.tokenize(text.encode(), add_bos=True, special=parse_special)
        if ours != theirs:
            mismatches.append((text, ours, theirs))
    assert not mismatches, f"{len(mismatches)} of {len(CORPUS)} differ, first: {mismatches[0]}"


def test_newline_runs(newline_vocab_file: Path) -> None:
    tokenizer = Tokenizer.from_gguf(newline_vocab_file)
    two, four, one = (tokenizer.encode(n, add_bos=False) for n in ("\n\n", "\n\n\n\n", "\n"))
    assert len(two) == len(four) == len(one) == 1
    assert tokenizer.encode("\n\n\n", add_bos=False) == two + one
    assert tokenizer.encode("a\n\n\n\n\nb", add_bos=False)[1:-1] == two + two + one


def test_round_trip_and_streaming(demo_model_file: Path) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    for text in CORPUS:
        ids = tokenizer.encode(text)
        assert tokenizer.decode(ids) == text
        stream = tokenizer.stream()
        pieces = [stream.push(i) for i in ids]
        pieces.append(stream.finish())
        assert "".join(pieces) == text
        assert not any("\ufffd" in p for p in pieces) or "\ufffd" in text


def test_stream_holds_back_split_characters(demo_model_file: Path) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    byte_ids = [tokenizer.tokens.index(f"<0x{b:02X}>") for b in "東".encode()]
    # Byte tokens are not special: their text in the input is tokenized like any other text.
    assert tokenizer.encode("<0xE6>", add_bos=False) != byte_ids[:1]
    stream = tokenizer.stream()
    assert [stream.push(i) for i in byte_ids] == ["", "", "東"]
    stream.push(byte_ids[0])
    assert stream.finish() == "\ufffd"
    assert tokenizer.decode(byte_ids[:2]) == "\ufffd"


def test_special_tokens(demo_model_file: Path) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    turn = tokenizer.tokens.index("<|turn>")
    ids = tokenizer.encode("<|turn>user", add_bos=False)
    assert ids[0] == turn
    assert turn not in tokenizer.encode("<|turn>user", add_bos=False, parse_special=False)
    assert tokenizer.decode(ids) == "<|turn>user"
    assert tokenizer.decode(ids, skip_special=True) == "user"
    assert tokenizer.decode([tokenizer.bos_id, tokenizer.bos_id]) == "<bos>"
    assert tokenizer.encode("")[0] == tokenizer.bos_id
    assert tokenizer.encode("", add_bos=False) == []


def test_end_of_generation_ids_match_llama_cpp(fixtures_dir: Path) -> None:
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    path = fixture_gguf(fixtures_dir, "gemma4-tiny-e")
    reference = llama_cpp.Llama(str(path), vocab_only=True, verbose=False)
    vocab = llama_cpp.llama_model_get_vocab(reference.model)
    tokenizer = Tokenizer.from_gguf(path)
    expected = {i for i in range(tokenizer.vocab_size) if llama_cpp.llama_vocab_is_eog(vocab, i)}
    assert tokenizer.end_of_generation_ids == expected
    assert {tokenizer.tokens[i] for i in expected} == {"<eos>", "<turn|>"}


def test_encode_chat_has_one_bos(fixtures_dir: Path) -> None:
    tokenizer = Tokenizer.from_gguf(fixture_gguf(fixtures_dir, "gemma4-tiny-e"))
    messages = [{"role": "user", "content": "Hi there"}]
    text = tokenizer.apply_chat_template(messages)
    assert text.startswith("<bos>")
    ids = tokenizer.encode_chat(messages)
    assert ids == tokenizer.encode(text, add_bos=False)
    assert ids.count(tokenizer.bos_id) == 1


def test_space_escape_character_decodes_as_space(demo_model_file: Path) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    assert tokenizer.decode(tokenizer.encode("a\u2581b")) == "a b"


@pytest.mark.parametrize(
    ("text", "error", "match"),
    [
        (b"bytes", TypeError, "must be a str"),
        (None, TypeError, "must be a str"),
        ("lone \ud800 surrogate", TokenizerError, "not valid Unicode.*index 5"),
    ],
)
def test_encode_rejects(demo_model_file: Path, text: object, error: type, match: str) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    with pytest.raises(error, match=match):
        tokenizer.encode(text)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("ids", "error", "match"),
    [
        ([5, -1], TokenizerError, "token id -1 out of range"),
        ([10**6], TokenizerError, "out of range"),
        ([1.5], TypeError, "must be integers"),
        (["3"], TypeError, "must be integers"),
        ([True], TypeError, "must be integers"),
    ],
)
def test_decode_rejects(demo_model_file: Path, ids: list, error: type, match: str) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    with pytest.raises(error, match=match):
        tokenizer.decode(ids)


def test_decode_accepts_numpy_ids(demo_model_file: Path) -> None:
    tokenizer = Tokenizer.from_gguf(demo_model_file)
    ids = tokenizer.encode("Hello world")
    assert tokenizer.decode(np.array(ids, dtype=np.int32)) == "Hello world"


def metadata_of(path: Path) -> dict[str, object]:
    return dict(read_gguf(path).metadata)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"tokenizer.ggml.model": "llama"}, "tokenizer.ggml.model is 'llama'"),
        ({"tokenizer.ggml.model": None}, "tokenizer.ggml.model is None"),
        ({"tokenizer.ggml.tokens": None}, "'tokenizer.ggml.tokens' is missing"),
        ({"tokenizer.ggml.tokens": []}, "vocabulary is empty"),
        ({"tokenizer.ggml.tokens": [1, 2]}, "must be a list of strings"),
        ({"tokenizer.ggml.merges": None}, "'tokenizer.ggml.merges' is missing"),
        ({"tokenizer.ggml.merges": ["nospace"]}, "merge 0 is 'nospace'"),
        ({"tokenizer.ggml.token_type": [1]}, "1 token types given"),
        ({"tokenizer.ggml.token_type": "x"}, "must be a list of integers"),
        ({"tokenizer.ggml.bos_token_id": 10**6}, "BOS token id 1000000 is outside"),
        ({"tokenizer.ggml.eos_token_id": "2"}, "must be an integer"),
        ({"tokenizer.ggml.eot_token_id": 10**6}, "end-of-generation token id"),
        ({"tokenizer.chat_template": 7}, "chat_template must be a string"),
    ],
)
def test_bad_metadata(demo_model_file: Path, change: dict[str, object], match: str) -> None:
    metadata = metadata_of(demo_model_file)
    for key, value in change.items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_metadata(metadata)


def test_bad_byte_token(demo_model_file: Path) -> None:
    metadata = metadata_of(demo_model_file)
    tokens = list(metadata["tokenizer.ggml.tokens"])  # type: ignore[call-overload]
    first_byte = tokens.index("<0x00>")
    tokens[first_byte] = "<0xZZ>"
    metadata["tokenizer.ggml.tokens"] = tokens
    with pytest.raises(TokenizerError, match="not of the form <0xXX>"):
        Tokenizer.from_metadata(metadata)


def test_from_gguf_errors_name_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(GGUFError, match="missing.gguf"):
        Tokenizer.from_gguf(missing)
    not_gguf = tmp_path / "notes.txt"
    not_gguf.write_text("hello")
    with pytest.raises(GGUFError, match="notes.txt"):
        Tokenizer.from_gguf(not_gguf)


def test_built_in_chat_template_where_the_file_has_none(demo_model_file: Path) -> None:
    metadata = metadata_of(demo_model_file)
    del metadata["tokenizer.chat_template"]
    tokenizer = Tokenizer.from_metadata(metadata)
    assert not tokenizer.has_own_chat_template
    messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": " Hi "}]
    assert tokenizer.apply_chat_template(messages) == (
        "<bos><|turn>system\nBe kind.<turn|>\n<|turn>user\nHi<turn|>\n<|turn>model\n"
    )
    assert tokenizer.apply_chat_template(messages, add_generation_prompt=False).endswith(
        "Hi<turn|>\n"
    )


@pytest.fixture(scope="module")
def merges_beyond_vocab_file(fixtures_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The e fixture with merges, ranked first, that name texts its vocabulary lacks: one makes
    a text that is no token ("q q"), two have a part that is no token ("Ω x", "x Ω")."""
    source = fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf"
    fields = GGUFReader(source).fields
    vocab = set(fields["tokenizer.ggml.tokens"].contents())
    assert {"q", "x"} <= vocab and "qq" not in vocab and "Ω" not in vocab
    merges = list(fields["tokenizer.ggml.merges"].contents())
    overrides = {"tokenizer.ggml.merges": ["q q", "Ω x", "x Ω", *merges]}
    target = tmp_path_factory.mktemp("merges") / "merges-beyond-vocab.gguf"
    return rewrite_gguf(source, target, overrides)


def test_merges_naming_absent_tokens_encode_as_llama_cpp(merges_beyond_vocab_file: Path) -> None:
    """Such a file loads, and encodes token for token as llama.cpp encodes it: the merges
    apply, and what they make that is no token comes out as byte tokens."""
    llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed")
    reference = llama_cpp.Llama(str(merges_beyond_vocab_file), vocab_only=True, verbose=False)
    tokenizer = Tokenizer.from_gguf(merges_beyond_vocab_file)
    samples = ["qq", "a qqq u", "Ωx", "xΩx xxΩΩxx", "Ω", "quiz qqquux ΩΩ", *CORPUS]
    mismatches = [
        (text, ours, theirs)
        for text in samples
        if (ours := tokenizer.encode(text))
        != (theirs := reference.tokenize(text.encode(), special=True))
    ]
    assert not mismatches, f"{len(mismatches)} of {len(samples)} differ, first: {mismatches[0]}"
    byte_q = tokenizer.token_id("<0x71>")
    assert tokenizer.encode("qq", add_bos=False) == [byte_q, byte_q]
    assert tokenizer.decode(tokenizer.encode("xΩx qq")) == "xΩx qq"


def test_merge_of_a_text_no_byte_token_spells_is_refused(demo_model_file: Path) -> None:
    metadata = metadata_of(demo_model_file)
    tokens = list(metadata["tokenizer.ggml.tokens"])  # type: ignore[call-overload]
    tokens[tokens.index("<0xCE>")] = "<unused-ce>"
    metadata["tokenizer.ggml.tokens"] = tokens
    metadata["tokenizer.ggml.merges"] = ["Ω x", *metadata["tokenizer.ggml.merges"]]  # type: ignore[misc]
    with pytest.raises(TokenizerError, match=r"merge 0 names 'Ω'.*no byte token <0xCE>"):
        Tokenizer.from_metadata(metadata)
