"""The assistant drafter: its logits and proposals equal transformers' on the tiny draft fixture,
with the plain head llama.cpp's converter keeps and with the centroid head of the checkpoint
(written into a copy of the GGUF), driven end to end from the target, one sequence or many per
call; files that do not belong to the target, truncated, of another architecture or with a
broken centroid head are refused with errors naming the problem."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import centroid_head_of, rewrite_gguf, with_centroid_head
from gguf import GGUFValueType

from pygemma4 import _core, open_model
from pygemma4.assistant_config import AssistantMismatchError, CentroidHead
from pygemma4.drafter import AssistantDrafter, DraftContext, DraftRequestError
from pygemma4.errors import GGUFError, UnsupportedModelError
from pygemma4.kv import BlockAllocator, KvLayout, SequenceKv
from pygemma4.runner import Feed, ModelRunner

N_BATCH = 16
K = 4
# The fixture's stored references were computed where transformers' float32 arithmetic strays
# from what it gives here: its target hidden states sit ~1e-3 and its shared K up to 2e-2 from
# transformers 5.24 on torch 2.13 (CPU), whose numbers this engine's target and drafter meet
# within 4e-5 (test_logits_equal_transformers_run_live). Against the stored references the
# drafter driven from this target is within that noise, amplified by random weights, with
# identical proposals.
STORED_LOGITS_ATOL = 7e-2
LIVE_LOGITS_ATOL = 1e-3


@pytest.fixture(scope="module")
def draft_dir(fixtures_dir: Path) -> Path:
    return fixtures_dir / "gemma4-tiny-draft"


@pytest.fixture(scope="module")
def ref(draft_dir: Path):
    return np.load(draft_dir / "ref_draft.npz")


@pytest.fixture(scope="module")
def runner(draft_dir: Path) -> tuple[ModelRunner, BlockAllocator]:
    model_file = open_model(draft_dir / "target-f32.gguf")
    layout = KvLayout.for_model(model_file.config, 128, 3, N_BATCH)
    runner = ModelRunner(model_file, layout.new_pool(model_file.config), N_BATCH, 2)
    return runner, BlockAllocator(layout)


@pytest.fixture(scope="module")
def drafter(runner, draft_dir: Path) -> AssistantDrafter:
    return AssistantDrafter(runner[0], draft_dir / "assistant-f32.gguf", max_sequences=3)


@pytest.fixture(scope="module")
def drafters(drafter, runner, ordered_drafter: Path) -> dict[str, AssistantDrafter]:
    """The drafter by head: "plain" (the converted file), "ordered" (its centroid head)."""
    return {"plain": drafter, "ordered": AssistantDrafter(runner[0], ordered_drafter, 3)}


def cases(ref) -> list[tuple[int, int]]:
    """(prompt, P) of every fixture drafting position."""
    return [(i, int(p)) for i in range(3) for p in ref[f"p{i}/draft_positions"]]


def prefill(runner: ModelRunner, allocator: BlockAllocator, ref, i: int, p: int):
    """A sequence holding s[0..P-1] of prompt i's text, and the target's outputs over it (the
    logits of every row, the hidden state of every row)."""
    text = np.concatenate([ref[f"p{i}/ids"], ref[f"p{i}/greedy"]]).astype(np.int32)
    kv = SequenceKv(allocator)
    result = runner.prefill(Feed(kv, text[:p], "all", hidden=True))
    return kv, text, result


def test_the_target_brings_back_the_stored_hidden_state_and_logits(runner, ref):
    for i, p in cases(ref):
        kv, _, result = prefill(*runner, ref, i, p)
        try:
            hidden_in = ref[f"p{i}/ordered/P{p}/hidden_in"]
            np.testing.assert_allclose(result.hidden[-1], hidden_in, atol=5e-3)
            n_prompt = len(ref[f"p{i}/ids"])
            np.testing.assert_allclose(
                result.logits[:n_prompt], ref[f"p{i}/logits"], atol=3e-2, rtol=0
            )
        finally:
            kv.release()


def test_the_ordered_file_carries_the_checkpoints_centroid_head(drafters, ref):
    head = drafters["ordered"].file.config.centroid_head
    assert head is not None and drafters["plain"].file.config.centroid_head is None
    assert (head.n_centroids, head.top_k) == (ref["num_centroids"], ref["centroid_top_k"])
    np.testing.assert_array_equal(head.token_ordering, ref["token_ordering"])


@pytest.mark.parametrize("head", ["plain", "ordered"])
@pytest.mark.parametrize("batched", [False, True], ids=["one-per-call", "all-in-one-call"])
def test_logits_and_proposals_equal_the_stored_ones(runner, drafters, ref, head, batched):
    """Within the stored references' noise (STORED_LOGITS_ATOL), the same proposals; with the
    centroid head the same tokens scored (the rest at the lowest score minus 1)."""
    drafter = drafters[head]
    for p_index in range(3):
        sequences = []
        try:
            for i in range(3):
                p = int(ref[f"p{i}/draft_positions"][p_index])
                kv, text, result = prefill(*runner, ref, i, p)
                sequences.append((i, p, DraftContext(kv, text[: p + 1], result.hidden[-1])))
            groups = [sequences] if batched else [[s] for s in sequences]
            for group in groups:
                tokens, logits = drafter.propose([r for _, _, r in group], K, with_logits=True)
                for row, (i, p, _) in enumerate(group):
                    expected = ref[f"p{i}/{head}/P{p}/draft_tokens"]
                    expected_logits = ref[f"p{i}/{head}/P{p}/draft_logits"]
                    where = f"prompt {i}, P {p}"
                    np.testing.assert_allclose(
                        logits[row], expected_logits, atol=STORED_LOGITS_ATOL, err_msg=where
                    )
                    assert tokens[row].tolist() == expected.tolist(), where
                    if head == "ordered":
                        np.testing.assert_array_equal(
                            scored(logits[row]), scored(expected_logits), err_msg=where
                        )
        finally:
            for _, _, r in sequences:
                r.kv.release()


def scored(logits: np.ndarray) -> np.ndarray:
    """Per step, which tokens the centroid head scored: all but those at the step's lowest
    logit, the mask value."""
    return logits > logits.min(axis=-1, keepdims=True)


@pytest.mark.parametrize("head", ["plain", "ordered"])
def test_logits_equal_transformers_run_live(runner, drafters, ref, draft_dir, head):
    """transformers' target and assistant (plain or centroid head), driven as its assisted
    generation drives them, at every fixture position: the target's hidden state within 1e-4,
    the drafter's logits within 1e-3 at each of K steps, the same proposals."""
    drafter = drafters[head]
    torch = pytest.importorskip("torch", reason="torch (CPU) runs transformers live")
    transformers = pytest.importorskip("transformers")
    from transformers.models.gemma4_assistant.modeling_gemma4_assistant import (
        Gemma4AssistantForCausalLM,
    )

    target = transformers.AutoModelForCausalLM.from_pretrained(
        draft_dir / "hf-target", dtype=torch.float32
    ).eval()
    config = transformers.AutoConfig.from_pretrained(draft_dir / "hf-assistant")
    config.use_ordered_embeddings = head == "ordered"  # plain: what llama.cpp's converter keeps
    assistant = Gemma4AssistantForCausalLM.from_pretrained(
        draft_dir / "hf-assistant", config=config, dtype=torch.float32
    ).eval()
    full, sliding = _shared_kv_layers(target.config)
    for i, p in cases(ref):
        kv, text, result = prefill(*runner, ref, i, p)
        try:
            with torch.no_grad():
                out = target(
                    torch.tensor(text[None, :p].astype(np.int64)),
                    output_hidden_states=True,
                    past_key_values=transformers.DynamicCache(),  # every position kept
                )
                hidden = out.hidden_states[-1][:, -1:]
                cache = out.past_key_values.layers
                shared = {
                    "full_attention": (cache[full].keys, cache[full].values),
                    "sliding_attention": (cache[sliding].keys, cache[sliding].values),
                }
                np.testing.assert_allclose(result.hidden[-1], hidden[0, 0].numpy(), atol=1e-4)
                token, expected_logits, expected_tokens = int(text[p]), [], []
                for _ in range(K):
                    embedded = target.model.embed_tokens(torch.tensor([[token]]))
                    step = assistant(
                        inputs_embeds=torch.cat([embedded, hidden], dim=-1),
                        position_ids=torch.tensor([[p]]),
                        shared_kv_states=shared,
                    )
                    expected_logits.append(step.logits[0, -1].numpy())
                    token = int(step.logits[0, -1].argmax())
                    expected_tokens.append(token)
                    hidden = step.last_hidden_state
            context = DraftContext(kv, text[: p + 1], result.hidden[-1])
            tokens, logits = drafter.propose([context], K, with_logits=True)
            where = f"prompt {i}, P {p}"
            np.testing.assert_allclose(
                logits[0], np.array(expected_logits), atol=LIVE_LOGITS_ATOL, err_msg=where
            )
            assert tokens[0].tolist() == expected_tokens, where
        finally:
            kv.release()


def _shared_kv_layers(config) -> tuple[int, int]:
    """The target's last full-attention and last sliding layer that store KV (the ones the
    assistant reads)."""
    stored = config.layer_types[: config.num_hidden_layers - config.num_kv_shared_layers]
    last = {kind: i for i, kind in enumerate(stored)}
    return last["full_attention"], last["sliding_attention"]


def test_fewer_steps_are_the_first_proposals(runner, drafter, ref):
    i, p = cases(ref)[0]
    kv, text, result = prefill(*runner, ref, i, p)
    try:
        request = DraftContext(kv, text[: p + 1], result.hidden[-1])
        expected = ref[f"p{i}/plain/P{p}/draft_tokens"]
        for k in range(1, K + 1):
            assert drafter.propose([request], k).tolist() == [expected[:k].tolist()]
    finally:
        kv.release()


def test_bad_requests_are_refused(runner, drafter, ref):
    i, p = cases(ref)[0]
    kv, text, result = prefill(*runner, ref, i, p)
    try:
        request = DraftContext(kv, text[: p + 1], result.hidden[-1])
        for k in (0, drafter.max_tokens + 1, 2.0):
            with pytest.raises(DraftRequestError, match="k must be"):
                drafter.propose([request], k)
        with pytest.raises(DraftRequestError, match="hidden state"):
            drafter.propose([DraftContext(kv, np.array([5]), np.zeros(3, np.float32))], 1)
        with pytest.raises(ValueError, match="out of range"):
            drafter.propose([DraftContext(kv, np.array([10**6]), result.hidden[-1])], 1)
        with pytest.raises(DraftRequestError, match="sequences"):
            drafter.propose([request] * 4, 1)
    finally:
        kv.release()


def test_a_target_file_is_not_a_drafter(runner, draft_dir):
    with pytest.raises(UnsupportedModelError, match="not 'gemma4-assistant'"):
        AssistantDrafter(runner[0], draft_dir / "target-f32.gguf")


def test_a_truncated_drafter_is_refused_naming_both_files(runner, draft_dir, tmp_path):
    data = (draft_dir / "assistant-f32.gguf").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(GGUFError, match="truncated") as error:
        AssistantDrafter(runner[0], truncated)
    assert "target-f32.gguf" in str(error.value)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("gemma4-assistant.embedding_length_out", 256, "width 256"),
        ("gemma4-assistant.attention.sliding_window", 8, "sliding window is 8"),
        ("gemma4-assistant.attention.head_count_kv", 1, "reads 1 KV heads"),
    ],
)
def test_a_drafter_of_another_model_is_refused_naming_both_files(
    runner, draft_dir, tmp_path, key, value, message
):
    wrong = rewrite_gguf(draft_dir / "assistant-f32.gguf", tmp_path / "wrong.gguf", {key: value})
    with pytest.raises(AssistantMismatchError, match=message) as error:
        AssistantDrafter(runner[0], wrong)
    assert "wrong.gguf" in str(error.value) and "target-f32.gguf" in str(error.value)


def test_a_drafter_needs_the_target_it_was_made_for(draft_dir, fixtures_dir, tmp_path):
    """The tiny E model has another vocabulary size or shape than the draft fixture's target."""
    other = shutil.copy(fixtures_dir / "gemma4-tiny-e" / "model-f32.gguf", tmp_path / "e.gguf")
    model_file = open_model(other)
    layout = KvLayout.for_model(model_file.config, 64, 1, N_BATCH)
    runner = ModelRunner(model_file, layout.new_pool(model_file.config), N_BATCH, 1)
    with pytest.raises(AssistantMismatchError, match="does not fit target"):
        AssistantDrafter(runner, draft_dir / "assistant-f32.gguf")


@pytest.fixture(scope="module")
def centroid_head(draft_dir: Path) -> tuple[np.ndarray, np.ndarray, int]:
    """The checkpoint's centroids, token ordering and top-k."""
    config = json.loads((draft_dir / "hf-assistant" / "config.json").read_text())
    return *centroid_head_of(draft_dir / "hf-assistant"), config["centroid_intermediate_top_k"]


def _swapped(ordering: np.ndarray, at: int, value: int) -> np.ndarray:
    changed = ordering.copy()
    changed[at] = value
    return changed


BAD_HEADS = {
    "centroids of another width": (
        lambda c, o, k: (c[:, :32], o, k),
        r"'masked_embd_centroids.weight' has shape \[32, 16\], not \[64 \(the drafter's width\)",
    ),
    "centroids that do not divide the vocabulary": (
        lambda c, o, k: (c[:10], o, k),
        "holds 10 centroids, which do not cut the 768 tokens into clusters of one size",
    ),
    "centroids of integers": (
        lambda c, o, k: (c.astype(np.int32), o, k),
        "'masked_embd_centroids.weight' has type I32, which pygemma4 cannot compute with",
    ),
    "a token twice": (
        lambda c, o, k: (c, _swapped(o, 1, o[0]), k),
        "not a permutation of the token ids 0..767: token 174 appears 2 times, token 348 never",
    ),
    "a token outside the vocabulary": (
        lambda c, o, k: (c, _swapped(o, 5, 768), k),
        "not a permutation of the token ids 0..767: entry 5 is 768, outside the vocabulary",
    ),
    "an ordering of another length": (
        lambda c, o, k: (c, o[:700], k),
        r"'masked_embd_ordering' is I32 \[700\], not I32 \[768\] \(one entry per token\)",
    ),
    "an ordering of floats": (
        lambda c, o, k: (c, o.astype(np.float32), k),
        r"'masked_embd_ordering' is F32 \[768\], not I32 \[768\]",
    ),
    "top-k 0": (
        lambda c, o, k: (c, o, 0),
        r"gemma4-assistant.centroid_top_k is 0, not within 1..16 \(the number of centroids\)",
    ),
    "top-k above the centroids": (
        lambda c, o, k: (c, o, 17),
        "gemma4-assistant.centroid_top_k is 17, not within 1..16",
    ),
    "no top-k": (
        lambda c, o, k: (c, o, None),
        "the centroid head lacks key 'gemma4-assistant.centroid_top_k'",
    ),
    "no ordering": (
        lambda c, o, k: (c, None, k),
        "the centroid head lacks tensor 'masked_embd_ordering'",
    ),
    "no centroids": (
        lambda c, o, k: (None, o, k),
        "the centroid head lacks tensor 'masked_embd_centroids.weight'",
    ),
}


@pytest.mark.parametrize("case", list(BAD_HEADS))
def test_a_broken_centroid_head_is_refused_naming_the_file(
    runner, draft_dir, centroid_head, tmp_path, case
):
    corrupt, message = BAD_HEADS[case]
    bad = with_centroid_head(
        draft_dir / "assistant-f32.gguf", tmp_path / "bad.gguf", *corrupt(*centroid_head)
    )
    with pytest.raises(UnsupportedModelError, match=message) as error:
        AssistantDrafter(runner[0], bad)
    assert str(bad) in str(error.value) and "target-f32.gguf" in str(error.value)


def test_the_core_refuses_a_centroid_head_the_file_does_not_fit(runner, drafters):
    """The core checks what the loader hands it: an ordering that is no permutation, a top-k
    out of range, a head without its centroids."""
    ordered, plain = drafters["ordered"].file, drafters["plain"].file
    head = ordered.config.centroid_head
    assert head is not None
    repeated = _swapped(head.token_ordering, 1, int(head.token_ordering[0]))
    for file, bad_head, message in [
        (ordered, CentroidHead(16, 4, repeated), "not a permutation of the 768 token ids"),
        (ordered, CentroidHead(16, 0, head.token_ordering), "top-k 0 is not within 1..16"),
        (plain, head, "need masked_embd_centroids.weight"),
    ]:
        config = dataclasses.replace(file.config, centroid_head=bad_head)
        tensors = [
            _core.TensorEntry(t.name, t.type_id, list(t.shape), t.offset, t.nbytes)
            for t in file.weights
        ]
        with pytest.raises(ValueError, match=message):
            _core.Assistant(runner[0].model, str(file.gguf.path), tensors, config, 1, 1)


def test_a_top_k_that_is_not_an_integer_is_refused(runner, draft_dir, centroid_head, tmp_path):
    centroids, ordering, _ = centroid_head
    bad = rewrite_gguf(
        draft_dir / "assistant-f32.gguf",
        tmp_path / "bad.gguf",
        {},
        new_keys={"gemma4-assistant.centroid_top_k": ("four", GGUFValueType.STRING)},
        new_tensors={"masked_embd_centroids.weight": centroids, "masked_embd_ordering": ordering},
    )
    with pytest.raises(GGUFError, match="'gemma4-assistant.centroid_top_k' must be") as error:
        AssistantDrafter(runner[0], bad)
    assert str(bad) in str(error.value)
