"""Token sampling: choosing the next token id of one sequence from one row of logits.

A `Sampler` turns the logits for a sequence's next position into a token id as its
`SamplingParams` say. Each call to `Sampler.sample` applies, in this order:

1. penalties: the repetition penalty (CTRL / Hugging Face style: a positive logit is divided by
   it, any other multiplied) once to every distinct token of the prompt and of the generated
   tokens; then the presence and frequency penalties (OpenAI style: the logit loses
   `presence_penalty + frequency_penalty * count`) to every distinct generated token;
   then, for a constrained sequence, the tokens its grammar does not allow now are set to
   -inf (`pygemma4.constraints`);
2. when the parameters are greedy (temperature 0, or top_k 1): the token with the highest
   logit, the lowest id among equals; otherwise
3. temperature: the logits are divided by it;
4. top-k: only the `top_k` most likely tokens are kept;
5. top-p: of those, only the smallest set of most likely tokens whose probabilities add up to
   at least `top_p` (never fewer than one token);
6. min-p: of those, only the tokens at least `min_p` times as likely as the most likely one;
7. a draw from the tokens left, their probabilities renormalised, with the sequence's own
   `numpy.random.Generator` (PCG64, seeded from `seed`).

Equally likely tokens are always ordered lower id first, so the outcome depends on nothing but
the logits, the parameters, the tokens seen so far and the seed. The log-probabilities
reported with each token are those of the model's raw distribution (the log-softmax of the
logits as given), whatever the parameters.
"""

from __future__ import annotations

import json
import math
import numbers
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Literal

import numpy as np

from pygemma4.errors import SamplingParamsError

__all__ = [
    "GREEDY",
    "MAX_LOGPROBS",
    "MAX_STOP_CHARS",
    "MAX_STOP_STRINGS",
    "SampledToken",
    "Sampler",
    "SamplingParams",
    "apply_penalties",
]

MAX_STOP_STRINGS = 16
MAX_STOP_CHARS = 256
MAX_LOGPROBS = 20

_F32_MAX = float(np.finfo(np.float32).max)
_F32_TINY = float(np.finfo(np.float32).tiny)
# Top-p without top-k first looks for the nucleus among this many most likely tokens: for a
# trained model's logits they nearly always hold it, and a partial selection is several times
# cheaper than sorting a whole 262,144-token vocabulary.
_TOP_P_CANDIDATES = 1024
# Cumulative sums over a whole vocabulary are taken per block: summing every block is cheap,
# and only the block holding the answer needs its running sum.
_CUMSUM_BLOCK = 2048


def _shown(value: object) -> str:
    """`value`'s repr, shortened to fit in an error message."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _number(name: str, value: object, allowed: str, ok: Callable[[float], bool]) -> float:
    """`value` as a float when it is a finite real number (not a bool) that `ok` accepts."""
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        number = float(value)
        if math.isfinite(number) and ok(number):
            return number
    raise SamplingParamsError(f"{name} must be {allowed}, got {_shown(value)}")


def _integer(name: str, value: object, allowed: str, ok: Callable[[int], bool]) -> int:
    """`value` as an int when it is an integer (not a bool) that `ok` accepts."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        number = int(value)
        if ok(number):
            return number
    raise SamplingParamsError(f"{name} must be {allowed}, got {_shown(value)}")


def _stop_strings(value: object) -> tuple[str, ...]:
    """`value` as a tuple of stop strings: one string, or an iterable of them."""
    allowed = (
        f"a string or a sequence of at most {MAX_STOP_STRINGS} non-empty strings "
        f"of at most {MAX_STOP_CHARS} characters"
    )
    if isinstance(value, str):
        items: tuple[object, ...] = (value,)
    elif isinstance(value, Iterable) and not isinstance(value, (bytes, bytearray, Mapping)):
        items = tuple(value)
    else:
        raise SamplingParamsError(f"stop must be {allowed}, got {_shown(value)}")
    if len(items) > MAX_STOP_STRINGS:
        raise SamplingParamsError(f"stop must be {allowed}, got {len(items)} strings")
    strings: list[str] = []
    for i, item in enumerate(items):
        if not isinstance(item, str) or not 0 < len(item) <= MAX_STOP_CHARS:
            raise SamplingParamsError(
                f"stop[{i}] must be a non-empty string of at most {MAX_STOP_CHARS} characters, "
                f"got {_shown(item)}"
            )
        strings.append(item)
    return tuple(strings)


def _check_unicode(name: str, text: str) -> None:
    """SamplingParamsError where `text` holds lone surrogates (no UTF-8 spells them)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise SamplingParamsError(
            f"{name} is not valid Unicode: {e.reason} at index {e.start}"
        ) from None


def _json_schema(value: object) -> str | None:
    """`value` when it is None or the JSON text of a schema (an object or a boolean)."""
    if value is None:
        return None
    if isinstance(value, str):
        _check_unicode("json_schema", value)
        try:
            schema = json.loads(value)
        except (json.JSONDecodeError, RecursionError) as e:
            raise SamplingParamsError(f"json_schema is not valid JSON: {e}") from None
        if isinstance(schema, (dict, bool)):
            return value
    raise SamplingParamsError(
        f"json_schema must be None or a JSON schema's text (an object), got {_shown(value)}"
    )


def _grammar(value: object) -> str | None:
    """`value` when it is None or a non-empty string."""
    if value is None or (isinstance(value, str) and value.strip()):
        if value is not None:
            _check_unicode("grammar", value)
        return value
    raise SamplingParamsError(
        f"grammar must be None or a non-empty Lark grammar, got {_shown(value)}"
    )


@dataclass(frozen=True)
class SamplingParams:
    """How to choose tokens: temperature, truncation, penalties, seed, stop strings, logprobs,
    and a JSON schema or grammar the output must follow.

    Every value is checked on construction; a bad one raises `SamplingParamsError` naming the
    parameter, its allowed values and the value given.
    """

    temperature: float = 1.0
    """Divides the logits; 0 means greedy. Finite, >= 0."""
    top_k: int = 0
    """Keep only the k most likely tokens; 0 disables. >= 0."""
    top_p: float = 1.0
    """Keep the smallest most likely set whose probability reaches it. In (0, 1]."""
    min_p: float = 0.0
    """Keep tokens at least this fraction as likely as the most likely. In [0, 1]."""
    repetition_penalty: float = 1.0
    """Penalty for tokens of the prompt or generated so far (1 disables). Finite, > 0."""
    presence_penalty: float = 0.0
    """Subtracted from the logit of every token generated so far. In [-2, 2]."""
    frequency_penalty: float = 0.0
    """Subtracted, times its count, from the logit of every generated token. In [-2, 2]."""
    seed: int | None = None
    """Seed of the random generator; None draws one from the OS. In [0, 2**64)."""
    stop: tuple[str, ...] = ()
    """Strings that end generation (a single string or a list is stored as a tuple)."""
    logprobs: int = 0
    """How many most likely tokens to report with their log-probabilities. In [0, 20]."""
    json_schema: str | None = None
    """A JSON schema, as JSON text, that the output must follow (`{"type": "object"}`: any
    JSON object); decoding is constrained to it (see `pygemma4.constraints`)."""
    grammar: str | None = None
    """A grammar in llguidance's Lark syntax that the output must follow (special tokens by
    their text, e.g. `<|tool_call>`); not together with `json_schema`."""

    def __post_init__(self) -> None:
        checked: dict[str, object] = {
            "temperature": _number(
                "temperature", self.temperature, "a finite number >= 0", lambda x: x >= 0
            ),
            "top_k": _integer(
                "top_k",
                self.top_k,
                "an integer in [0, 2**31) (0 disables it)",
                lambda k: 0 <= k < 2**31,
            ),
            "top_p": _number("top_p", self.top_p, "in (0, 1]", lambda x: 0 < x <= 1),
            "min_p": _number("min_p", self.min_p, "in [0, 1]", lambda x: 0 <= x <= 1),
            "repetition_penalty": _number(
                "repetition_penalty",
                self.repetition_penalty,
                "a finite number > 0 (1 disables it)",
                lambda x: x > 0,
            ),
            "presence_penalty": _number(
                "presence_penalty", self.presence_penalty, "in [-2, 2]", lambda x: -2 <= x <= 2
            ),
            "frequency_penalty": _number(
                "frequency_penalty", self.frequency_penalty, "in [-2, 2]", lambda x: -2 <= x <= 2
            ),
            "seed": None
            if self.seed is None
            else _integer(
                "seed", self.seed, "None or an integer in [0, 2**64)", lambda s: 0 <= s < 2**64
            ),
            "stop": _stop_strings(self.stop),
            "logprobs": _integer(
                "logprobs",
                self.logprobs,
                f"an integer in [0, {MAX_LOGPROBS}]",
                lambda n: 0 <= n <= MAX_LOGPROBS,
            ),
            "json_schema": _json_schema(self.json_schema),
            "grammar": _grammar(self.grammar),
        }
        if self.json_schema is not None and self.grammar is not None:
            raise SamplingParamsError("json_schema and grammar cannot both be given")
        for name, value in checked.items():
            object.__setattr__(self, name, value)

    @property
    def constrained(self) -> bool:
        """Whether a schema or grammar constrains the output."""
        return self.json_schema is not None or self.grammar is not None

    @property
    def greedy(self) -> bool:
        """Whether these parameters always choose the most likely token."""
        return self.temperature == 0.0 or self.top_k == 1

    @classmethod
    def from_mapping(cls, values: Mapping[str, object]) -> SamplingParams:
        """Parameters from a name -> value mapping (a request, CLI options); names it does not
        know are an error, names it lacks keep their defaults."""
        if not isinstance(values, Mapping):
            raise SamplingParamsError(
                f"sampling parameters must be a mapping of names to values, "
                f"got {type(values).__name__}"
            )
        known = [f.name for f in fields(cls)]
        unknown = [key for key in values if key not in known]
        if unknown:
            plural = "s" if len(unknown) > 1 else ""
            raise SamplingParamsError(
                f"unknown sampling parameter{plural} {', '.join(_shown(k) for k in unknown)}; "
                f"the known ones are {', '.join(known)}"
            )
        return cls(**values)

    def to_dict(self) -> dict[str, object]:
        """The parameters as plain JSON-compatible values (`stop` as a list), by name;
        `from_mapping` turns the result back into equal parameters."""
        values: dict[str, object] = {f.name: getattr(self, f.name) for f in fields(self)}
        values["stop"] = list(self.stop)
        return values


GREEDY = SamplingParams(temperature=0.0)
"""Parameters that always choose the most likely token."""


@dataclass(frozen=True)
class SampledToken:
    """A chosen token with log-probabilities under the model's raw distribution."""

    token_id: int
    logprob: float
    """Log-probability of `token_id`: the log-softmax of the logits as given."""
    top_logprobs: tuple[tuple[int, float], ...]
    """The `logprobs` most likely (id, log-probability) pairs, most likely first."""


class _TokenCounts:
    """Distinct token ids in first-seen order, each with how many times it was seen."""

    def __init__(self) -> None:
        self._index: dict[int, int] = {}
        self._ids = np.empty(64, dtype=np.intp)
        self._counts = np.empty(64, dtype=np.float64)

    def __len__(self) -> int:
        return len(self._index)

    @property
    def ids(self) -> np.ndarray:
        """The distinct ids seen."""
        return self._ids[: len(self._index)]

    @property
    def counts(self) -> np.ndarray:
        """How many times each of `ids` was seen."""
        return self._counts[: len(self._index)]

    def add(self, token_id: int, count: int = 1) -> None:
        """Count `token_id` `count` more times."""
        i = self._index.get(token_id)
        if i is None:
            i = len(self._index)
            if i == len(self._ids):
                self._ids = np.concatenate([self._ids, np.empty_like(self._ids)])
                self._counts = np.concatenate([self._counts, np.empty_like(self._counts)])
            self._index[token_id] = i
            self._ids[i] = token_id
            self._counts[i] = 0.0
        self._counts[i] += count

    def add_all(self, token_ids: np.ndarray) -> None:
        """Count every id of `token_ids`."""
        ids, counts = np.unique(token_ids, return_counts=True)
        for token_id, count in zip(ids.tolist(), counts.tolist(), strict=True):
            self.add(token_id, count)


def _as_logits(logits: object, vocab_size: int | None) -> np.ndarray:
    """`logits` as a 1-D float32 array (the caller's own array where it already is one)."""
    array = np.asarray(logits)
    if array.ndim != 1:
        raise ValueError(f"logits must be 1-D, of shape (vocab_size,), got shape {array.shape}")
    if vocab_size is not None and array.shape[0] != vocab_size:
        raise ValueError(
            f"logits have shape {array.shape}, but the sampler's vocabulary has {vocab_size} "
            f"tokens: expected shape ({vocab_size},)"
        )
    if array.shape[0] == 0:
        raise ValueError("logits are empty (shape (0,))")
    if array.dtype.kind not in "fiu":
        raise ValueError(f"logits must be real numbers, got dtype {array.dtype}")
    return array.astype(np.float32, copy=False)


def _checked_max(logits: np.ndarray) -> float:
    """The largest logit, which must be finite; NaN and +inf anywhere are errors."""
    top = float(logits.max())  # NaN propagates through max
    if math.isnan(top):
        first = int(np.flatnonzero(np.isnan(logits))[0])
        raise ValueError(f"logits contain NaN (first at index {first})")
    if top == math.inf:
        raise ValueError(f"logits contain +inf (first at index {int(np.argmax(logits))})")
    if top == -math.inf:
        raise ValueError("logits are all -inf: no token can be chosen")
    return top


def _as_token_ids(name: str, values: Iterable[int], vocab_size: int | None) -> np.ndarray:
    """`values` as a 1-D array of token ids, each in [0, vocab_size)."""
    try:
        array = np.asarray(values if isinstance(values, np.ndarray) else list(values))
    except (TypeError, ValueError, OverflowError):
        array = np.asarray([None])
    if array.size == 0:
        return np.empty(0, dtype=np.intp)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"{name} must be a sequence of integer token ids, got {_shown(values)}")
    low, high = int(array.min()), int(array.max())
    if low < 0:
        raise ValueError(f"{name} contains the negative token id {low}")
    if vocab_size is not None and high >= vocab_size:
        raise ValueError(f"{name} contains the token id {high}, outside [0, {vocab_size})")
    return array.astype(np.intp, copy=False)


def _store_float32(work: np.ndarray, ids: np.ndarray, values: np.ndarray) -> None:
    """Write float64 `values` to `work[ids]`, finite values clamped to float32's range."""
    # A penalty must neither mask a token (-inf) nor leave +inf behind (which would make every
    # probability NaN); only logits that were -inf before stay -inf.
    masked = values == -math.inf
    values = np.clip(values, -_F32_MAX, _F32_MAX)
    values[masked] = -math.inf
    work[ids] = values


def _penalise(
    work: np.ndarray,
    params: SamplingParams,
    seen_ids: np.ndarray,
    generated_ids: np.ndarray,
    generated_counts: np.ndarray,
) -> None:
    """Apply `params`' penalties to `work` in place: repetition to the distinct `seen_ids`,
    presence and frequency to the distinct `generated_ids` seen `generated_counts` times."""
    penalty = params.repetition_penalty
    if penalty != 1.0 and seen_ids.size:
        values = work[seen_ids].astype(np.float64)
        _store_float32(work, seen_ids, np.where(values > 0, values / penalty, values * penalty))
    if (params.presence_penalty or params.frequency_penalty) and generated_ids.size:
        values = work[generated_ids].astype(np.float64)
        values -= params.presence_penalty + params.frequency_penalty * generated_counts
        _store_float32(work, generated_ids, values)


def apply_penalties(
    logits: np.ndarray,
    params: SamplingParams,
    prompt_ids: Iterable[int] = (),
    generated_ids: Iterable[int] = (),
) -> np.ndarray:
    """The logits after `params`' penalties, as a new float32 array; `logits` is left as is.

    The repetition penalty applies once to every distinct token of `prompt_ids` and
    `generated_ids`, the presence penalty once to every distinct token of `generated_ids`, the
    frequency penalty to those times the number of times each occurs there. This is the first
    step of `Sampler.sample`.
    """
    work = _as_logits(logits, None).copy()
    vocab_size = work.shape[0]
    prompt = _as_token_ids("prompt_ids", prompt_ids, vocab_size)
    generated = _as_token_ids("generated_ids", generated_ids, vocab_size)
    generated_unique, counts = np.unique(generated, return_counts=True)
    seen = np.unique(np.concatenate([prompt, generated]))
    _penalise(work, params, seen, generated_unique, counts.astype(np.float64))
    return work


def _scratch(name: str, n: int, dtype: type[np.generic]) -> np.ndarray:
    """A reusable array of `n` elements of `dtype` belonging to this thread and `name`, with
    arbitrary contents."""
    # Vocabulary-sized temporaries allocated and freed on every token cost more than the
    # arithmetic on them: the allocator returns the memory to the OS at each free and every
    # page faults again on the next token (measured: 2.5 ms instead of 0.5 ms a token).
    buffers: dict[str, np.ndarray] = _thread_scratch.__dict__.setdefault("buffers", {})
    buffer = buffers.get(name)
    if buffer is None or buffer.shape[0] < n:
        buffer = buffers[name] = np.empty(n, dtype=dtype)
    return buffer[:n]


_thread_scratch = threading.local()


def _weights(
    logits: np.ndarray, top: float, temperature: np.float32, out: np.ndarray | None = None
) -> np.ndarray:
    """exp((logits - top) / temperature) in float32, into `out` where given: probabilities up
    to a common factor, 1 for a logit equal to `top`."""
    scaled = np.subtract(logits, np.float32(top), out=out)
    if temperature != 1.0:
        scaled /= temperature
    return np.exp(scaled, out=scaled)


def _cumulative_search(weights: np.ndarray, target: float, side: Literal["left", "right"]) -> int:
    """Index of the first running sum of `weights` that reaches `target` (side "left": >=,
    "right": >), the last index where none does. Sums are accumulated in float64."""
    n = weights.shape[0]
    if n <= 2 * _CUMSUM_BLOCK:
        running = np.cumsum(weights, dtype=np.float64)
        return min(int(np.searchsorted(running, target, side)), n - 1)
    starts = np.arange(0, n, _CUMSUM_BLOCK)
    block_ends = np.cumsum(np.add.reduceat(weights, starts, dtype=np.float64))
    block = min(int(np.searchsorted(block_ends, target, side)), len(starts) - 1)
    before = float(block_ends[block - 1]) if block else 0.0
    start = int(starts[block])
    running = before + np.cumsum(weights[start : start + _CUMSUM_BLOCK], dtype=np.float64)
    return start + min(int(np.searchsorted(running, target, side)), len(running) - 1)


def _kth_largest(values: np.ndarray, k: int) -> np.float32:
    """The `k`th largest of the float32 `values` (1 <= k <= len(values))."""
    n = values.shape[0]
    selection = _scratch("select", n, np.float32)
    np.copyto(selection, values)
    selection.partition(n - k)
    return selection[n - k]


def _first_ids(values: np.ndarray, threshold: np.float32, count: int) -> np.ndarray:
    """Indices, ascending, of the `values` above `threshold`, and of the first of those equal
    to it until there are `count` in all."""
    keep = np.greater(values, threshold, out=_scratch("keep", values.shape[0], np.bool_))
    missing = count - int(np.count_nonzero(keep))
    if missing > 0:
        keep[np.flatnonzero(values == threshold)[:missing]] = True
    return np.flatnonzero(keep)


def _top_ids(values: np.ndarray, k: int) -> np.ndarray:
    """The indices of the `k` largest float32 `values` (lower index first among equals),
    ascending."""
    n = values.shape[0]
    if k >= n:
        return np.arange(n)
    return _first_ids(values, _kth_largest(values, k), k)


def _nucleus(weights: np.ndarray, target: float) -> np.ndarray:
    """Positions, ascending, of the fewest largest `weights` (lower position first among
    equals) whose sum reaches `target`; all of them where none do."""
    n = weights.shape[0]
    excess = float(weights.sum(dtype=np.float64)) - target
    if excess < 0:
        return np.arange(n)
    ascending = _scratch("select", n, np.float32)
    np.copyto(ascending, weights)
    ascending.sort()
    # What is left out is the longest run of the least likely whose sum stays within `excess`.
    left_out = _cumulative_search(ascending, excess, "right")
    return _first_ids(weights, ascending[left_out], n - left_out)


def _vocab_nucleus(weights: np.ndarray, top_p: float) -> np.ndarray:
    """Token ids, ascending, of the top-p nucleus of a whole vocabulary's `weights`."""
    n = weights.shape[0]
    target = top_p * float(weights.sum(dtype=np.float64))
    if n > _TOP_P_CANDIDATES:
        kth = _kth_largest(weights, _TOP_P_CANDIDATES)
        # Every token at least as likely as the kth is a candidate, so the candidates are a
        # prefix of the likelihood order even where the kth has equals, and hold the nucleus
        # whenever their mass reaches the target.
        candidates = np.flatnonzero(
            np.greater_equal(weights, kth, out=_scratch("keep", n, np.bool_))
        )
        candidate_weights = weights[candidates]
        if float(candidate_weights.sum(dtype=np.float64)) >= target:
            return candidates[_nucleus(candidate_weights, target)]
    return _nucleus(weights, target)


def _masked(work: np.ndarray, raw: np.ndarray, allowed: np.ndarray) -> np.ndarray:
    """`work` with every token `allowed` does not mark at -inf: in place where `work` is
    already this thread's scratch copy, else in a copy (`raw` is never changed)."""
    if allowed.shape != work.shape or allowed.dtype != np.bool_:
        raise ValueError(
            f"allowed must be a boolean array of shape {work.shape}, got {allowed.dtype} "
            f"{allowed.shape}"
        )
    if work is raw:
        work = _scratch("work", raw.shape[0], np.float32)
        np.copyto(work, raw)
    np.putmask(work, ~allowed, np.float32(-math.inf))
    if float(work.max()) == -math.inf:
        raise ValueError("no token the constraint allows has a finite logit")
    return work


class Sampler:
    """Chooses tokens for one sequence: holds the parameters, the random generator and the
    token counts the penalties need."""

    def __init__(
        self,
        params: SamplingParams,
        prompt_ids: Sequence[int] = (),
        vocab_size: int | None = None,
    ) -> None:
        """A sampler for a sequence that starts with `prompt_ids` (which count for the
        repetition penalty); `vocab_size`, where given, is the length every logits row must
        have and the bound on token ids."""
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params must be SamplingParams, got {type(params).__name__}")
        if vocab_size is not None and (
            isinstance(vocab_size, bool)
            or not isinstance(vocab_size, numbers.Integral)
            or vocab_size < 1
        ):
            raise ValueError(f"vocab_size must be None or an integer >= 1, got {vocab_size!r}")
        self.params = params
        self.vocab_size = None if vocab_size is None else int(vocab_size)
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._temperature = np.float32(min(max(params.temperature, _F32_TINY), _F32_MAX))
        self._repetition = params.repetition_penalty != 1.0
        self._presence_frequency = params.presence_penalty != 0 or params.frequency_penalty != 0
        self._seen = _TokenCounts()  # prompt and generated: the repetition penalty
        self._generated = _TokenCounts()  # generated only: presence and frequency penalties
        self._max_id = -1
        prompt = _as_token_ids("prompt_ids", prompt_ids, self.vocab_size)
        if self._repetition and prompt.size:
            self._seen.add_all(prompt)
            self._max_id = int(prompt.max())

    @property
    def needs_logits(self) -> bool:
        """Whether a choice needs the whole logits row: anything but greedy without penalties,
        top log-probabilities or a constraint, which only needs the most likely token and its
        log-probability (what a GPU can give without sending the row)."""
        return (
            not self.params.greedy
            or self._repetition
            or self._presence_frequency
            or self.params.logprobs > 0
            or self.params.constrained
        )

    def accept(self, token_id: int) -> None:
        """Record `token_id` as generated (chosen elsewhere, e.g. forced) for the penalties."""
        if isinstance(token_id, bool) or not isinstance(token_id, numbers.Integral):
            raise TypeError(f"token_id must be an integer, got {_shown(token_id)}")
        token = int(token_id)
        if token < 0 or (self.vocab_size is not None and token >= self.vocab_size):
            bound = "" if self.vocab_size is None else f", < {self.vocab_size}"
            raise ValueError(f"token_id must be >= 0{bound}, got {token}")
        self._record(token)

    def sample(
        self, logits: np.ndarray, allowed: np.ndarray | None = None, draft: int | None = None
    ) -> SampledToken:
        """Choose the next token from the 1-D `logits` of one position and record it for the
        penalties; `logits` is left as is. `allowed`, where given, is a boolean array as long
        as `logits` (a constraint's mask): only the tokens it marks can be chosen.

        With `draft` (a token a drafter proposed for this position), a sampled choice keeps
        the draft with its probability p(draft) and otherwise draws from the distribution
        without it, so the token chosen follows exactly the distribution it would without a
        draft (speculative sampling with a drafter that proposes one token); a greedy choice
        is the most likely token either way."""
        raw = _as_logits(logits, self.vocab_size)
        raw_top = _checked_max(raw)
        raw_weights = _weights(
            raw, raw_top, np.float32(1.0), _scratch("raw_weights", raw.shape[0], np.float32)
        )
        log_total = raw_top + math.log(float(raw_weights.sum(dtype=np.float64)))
        work = self._penalised(raw)
        if allowed is not None:
            work = _masked(work, raw, allowed)
        if self.params.greedy:
            token = int(np.argmax(work))
        else:
            full = raw_weights if work is raw and self._temperature == 1.0 else None
            ids, weights = self._truncated(work, full)
            token = self._draw(ids, weights) if draft is None else self._judge(ids, weights, draft)
        self._record(token)
        return SampledToken(
            token, float(raw[token]) - log_total, self._top_logprobs(raw, log_total)
        )

    def distribution(self, logits: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The distribution `sample` would draw the next token from, as (token ids ascending,
        probabilities) over the tokens it could choose; nothing is drawn or recorded."""
        raw = _as_logits(logits, self.vocab_size)
        _checked_max(raw)
        work = self._penalised(raw)
        if self.params.greedy:
            return np.array([int(np.argmax(work))]), np.ones(1)
        ids, weights = self._truncated(work, None)
        if ids is None:
            ids = np.arange(work.shape[0])
        possible = weights > 0
        kept = weights[possible].astype(np.float64)
        return ids[possible], kept / kept.sum()

    def _record(self, token: int) -> None:
        if self._repetition:
            self._seen.add(token)
        if self._presence_frequency:
            self._generated.add(token)
        if self._repetition or self._presence_frequency:
            self._max_id = max(self._max_id, token)

    def _penalised(self, raw: np.ndarray) -> np.ndarray:
        """`raw` after the penalties: `raw` itself when none applies, else this thread's
        scratch copy."""
        if not (
            (self._repetition and len(self._seen))
            or (self._presence_frequency and len(self._generated))
        ):
            return raw
        if self._max_id >= raw.shape[0]:
            raise ValueError(
                f"logits have shape {raw.shape}, but token id {self._max_id} was seen earlier "
                "in this sequence"
            )
        work = _scratch("work", raw.shape[0], np.float32)
        np.copyto(work, raw)
        _penalise(work, self.params, self._seen.ids, self._generated.ids, self._generated.counts)
        return work

    def _truncated(
        self, work: np.ndarray, full_weights: np.ndarray | None
    ) -> tuple[np.ndarray | None, np.ndarray]:
        """The tokens top-k, top-p and min-p keep of `work` (ids ascending; None for all) and
        their unnormalised probabilities; `full_weights`, where given, are those of all."""
        params = self.params
        temperature = self._temperature
        top = float(work.max())
        ids: np.ndarray | None = None
        weights = full_weights
        if 0 < params.top_k < work.shape[0]:
            # The order of the logits is that of the probabilities, so top-k needs no softmax.
            ids = _top_ids(work, params.top_k)
            weights = None if full_weights is None else full_weights[ids]
        if params.top_p < 1.0:
            if ids is None:
                if weights is None:
                    weights = _weights(
                        work, top, temperature, _scratch("weights", work.shape[0], np.float32)
                    )
                ids = _vocab_nucleus(weights, params.top_p)
                weights = weights[ids]
            else:
                if weights is None:
                    weights = _weights(work[ids], top, temperature)
                kept = _nucleus(weights, params.top_p * float(weights.sum(dtype=np.float64)))
                ids, weights = ids[kept], weights[kept]
        if params.min_p > 0.0:
            # p >= min_p * p_max  <=>  logit >= top + temperature * log(min_p); the bound is
            # rounded up to a float32 so that comparing with float32 logits stays exact. p_max
            # is that of the tokens still kept: at extreme temperatures every weight rounds to
            # 1, and top-p may then have kept equals that do not include the top logit.
            kept_top = top if ids is None else float(work[ids].max())
            bound = kept_top + float(temperature) * math.log(params.min_p)
            cut = np.float32(bound)
            if float(cut) < bound:
                cut = np.nextafter(cut, np.float32(math.inf))
            if ids is None:
                keep = _scratch("keep", work.shape[0], np.bool_)
                ids = np.flatnonzero(np.greater_equal(work, cut, out=keep))
                weights = None if weights is None else weights[ids]
            else:
                kept = work[ids] >= cut
                ids = ids[kept]
                weights = None if weights is None else weights[kept]
        if weights is None:
            if ids is None:
                out = _scratch("weights", work.shape[0], np.float32)
                weights = _weights(work, top, temperature, out)
            else:
                weights = _weights(work[ids], top, temperature)
        return ids, weights

    def _draw(self, ids: np.ndarray | None, weights: np.ndarray) -> int:
        """A token drawn from `ids` (None: all) with probabilities proportional to `weights`."""
        target = self._rng.random() * float(weights.sum(dtype=np.float64))
        i = _cumulative_search(weights, target, "right")
        if weights[i] == 0:
            # Only rounding between differently summed totals lands here; take the nearest
            # possible token before it (or the first one).
            possible = np.flatnonzero(weights)
            before = int(np.searchsorted(possible, i))
            i = int(possible[before - 1] if before else possible[0])
        return i if ids is None else int(ids[i])

    def _judge(self, ids: np.ndarray | None, weights: np.ndarray, draft: int) -> int:
        """`draft` with probability weight(draft) / total; otherwise a token drawn from the
        others in proportion to their weights."""
        at = draft if ids is None else int(np.searchsorted(ids, draft))
        kept = 0 <= at < len(weights) and (ids is None or ids[at] == draft)
        draft_weight = float(weights[at]) if kept else 0.0
        if self._rng.random() * float(weights.sum(dtype=np.float64)) < draft_weight:
            return draft
        others = weights.copy()
        if kept:
            others[at] = 0
        return self._draw(ids, others)

    def _top_logprobs(self, raw: np.ndarray, log_total: float) -> tuple[tuple[int, float], ...]:
        count = self.params.logprobs
        if count == 0:
            return ()
        ids = _top_ids(raw, count)
        ids = ids[np.lexsort((ids, -raw[ids]))]
        return tuple((int(i), float(raw[i]) - log_total) for i in ids)
