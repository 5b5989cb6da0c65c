"""A Jinja sandbox whose renders stay within `pygemma4.template_limits`.

Jinja's own sandbox keeps a template away from files, imports and Python internals, but not from
time and memory: `'x' * 10**10` or two nested loops over `range(99999)` run until the process
dies. `BoundedSandbox` checks, before each operation that can allocate, how large its result
would be (repetition and concatenation, `%` and `format` with their widths, string methods such
as `center`, `join` or `replace`, filters such as `indent`, `tojson` or `batch`, output of any
value), charges every value it creates to the render's allocation budget, counts the characters
of every block it produces, checks the clock on every loop iteration, call and operation, and
counts how deep calls nest. The checks are cooperative: nothing runs in another thread, no signal
interrupts the render.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import operator
import re
import string
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextvars import ContextVar
from typing import Any

from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.runtime import Context
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace, generate_lorem_ipsum

from pygemma4 import template_limits as limits
from pygemma4.errors import ChatTemplateLimitError

__all__ = ["BoundedSandbox", "render_bounded"]

# Bytes assumed for each small object a split or an iteration makes (a str header and a list
# slot), so that exploding a string into pieces is charged what it costs.
_OBJECT_BYTES = 64
# How many characters one character of a string may become in a repr or JSON (`\U0001f600`,
# `\ud83d\ude00`).
_ESCAPED_CHARACTER = 12
_LOOP_FILTER = "__bounded_loop"
_OPERAND_FILTER = "__bounded_operand"
# Filters and tests that compare values, which takes time in proportion to their whole size.
_COMPARING_FILTERS = frozenset({"sort", "unique", "min", "max", "groupby", "dictsort"})
_COMPARING_TESTS = frozenset(
    {"eq", "equalto", "==", "ne", "!=", "lt", "lessthan", "<", "le", "<="}
    | {"gt", "greaterthan", ">", "ge", ">=", "in"}
)
_FOOTPRINT_SAMPLE = 4096


class RenderBudget:
    """What one render has used of its limits."""

    __slots__ = ("allocated", "deadline", "depth")

    def __init__(self) -> None:
        self.deadline = time.monotonic() + limits.RENDER_SECONDS
        self.allocated = 0
        self.depth = 0

    def tick(self) -> None:
        """Fail once the render has run out of time."""
        if time.monotonic() > self.deadline:
            raise ChatTemplateLimitError(
                "RENDER_SECONDS",
                f"the chat template ran past its time limit of {limits.RENDER_SECONDS:g} s "
                "(template_limits.RENDER_SECONDS)",
            )

    def require(self, nbytes: int, what: str) -> None:
        """Fail when `nbytes` more would take the render past its allocation limit."""
        if self.allocated + nbytes > limits.ALLOCATION_BYTES:
            raise ChatTemplateLimitError(
                "ALLOCATION_BYTES",
                f"the chat template would allocate more than its limit of "
                f"{limits.ALLOCATION_BYTES // 2**20} MiB (template_limits.ALLOCATION_BYTES) "
                f"in {what} (about {nbytes:,} bytes more)",
            )

    def charge(self, nbytes: int, what: str) -> None:
        """Count `nbytes` as allocated, failing past the limit."""
        self.require(nbytes, what)
        self.allocated += nbytes


_active: ContextVar[RenderBudget | None] = ContextVar("pygemma4_template_budget", default=None)


def _budget() -> RenderBudget:
    budget = _active.get()
    if budget is None:
        # Outside a render: Jinja tried to fold a constant while compiling, which it abandons
        # on any exception, leaving the work to the render, where it is bounded.
        raise RuntimeError("a bounded operation outside a render")
    return budget


def render_bounded(render: Callable[[], str]) -> str:
    """Run `render` (a Jinja render of a `BoundedSandbox` template) within the limits."""
    token = _active.set(RenderBudget())
    try:
        return render()
    except RecursionError:
        raise ChatTemplateLimitError(
            "CALL_DEPTH",
            "the chat template recursed deeper than Python allows, before the limit of "
            f"{limits.CALL_DEPTH} calls (template_limits.CALL_DEPTH)",
        ) from None
    except MemoryError:
        raise ChatTemplateLimitError(
            "ALLOCATION_BYTES",
            "the chat template ran the process out of memory before its limit of "
            f"{limits.ALLOCATION_BYTES // 2**20} MiB (template_limits.ALLOCATION_BYTES)",
        ) from None
    finally:
        _active.reset(token)


def _char_bytes(text: str | bytes) -> int:
    return 1 if isinstance(text, bytes) or text.isascii() else 4


def _limit_integer(bits: int, what: str) -> None:
    if bits > limits.INTEGER_BITS:
        raise ChatTemplateLimitError(
            "INTEGER_BITS",
            f"{what} would compute an integer of about {bits:,} bits, past the limit of "
            f"{limits.INTEGER_BITS:,} (template_limits.INTEGER_BITS)",
        )


def _limit_output(characters: int, what: str) -> None:
    if characters > limits.OUTPUT_CHARACTERS:
        raise ChatTemplateLimitError(
            "OUTPUT_CHARACTERS",
            f"{what} would produce about {characters:,} characters, past the output limit of "
            f"{limits.OUTPUT_CHARACTERS:,} (template_limits.OUTPUT_CHARACTERS)",
        )


def text_length(
    value: Any, budget: RenderBudget, escaped: bool = True, indent: int = 0, what: str = ""
) -> int:
    """An upper bound of the length of `value` as text (str, repr or JSON, with `indent` per
    nesting level), failing once it passes what the render may still allocate (naming `what`
    the value is for)."""
    if isinstance(value, (str, bytes)) and not escaped:
        return len(value)
    room = limits.ALLOCATION_BYTES - budget.allocated
    total = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    steps = 0
    while stack:
        item, depth = stack.pop()
        steps += 1
        if steps % 1024 == 0:
            budget.tick()
        total += 2 + indent * depth
        if isinstance(item, (str, bytes)):
            total += len(item) * (_ESCAPED_CHARACTER if escaped else 1)
        elif isinstance(item, bool) or item is None:
            total += 5
        elif isinstance(item, int):
            total += item.bit_length() // 3 + 2
        elif isinstance(item, Mapping):
            for key, entry in item.items():
                stack.append((key, depth + 1))
                stack.append((entry, depth + 1))
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend((entry, depth + 1) for entry in item)
        elif isinstance(item, Namespace):
            # Jinja keeps a namespace's attributes in this name-mangled dict.
            stack.append((object.__getattribute__(item, "_Namespace__attrs"), depth))
        else:
            total += 32
        if total > room:
            budget.require(total, what or f"the text of a {type(value).__name__}")
    return total


def _footprint(value: Any) -> int:
    """Bytes `value` took to create: its own size and that of the strings and numbers it holds
    (for long containers, extrapolated from their first items)."""
    if not isinstance(value, (list, tuple, set, frozenset, dict)):
        return sys.getsizeof(value)
    items = value.values() if isinstance(value, dict) else value
    sample = list(itertools.islice(items, _FOOTPRINT_SAMPLE))
    held = sum(sys.getsizeof(i) for i in sample if isinstance(i, (str, bytes, int, float)))
    return sys.getsizeof(value) + held * len(value) // max(len(sample), 1)


def _iterated(values: Iterable[Any], budget: RenderBudget, what: str) -> Iterator[Any]:
    """`values` one by one, checking the clock and charging each as produced."""
    for value in values:
        budget.tick()
        budget.charge(_footprint(value), what)
        yield value


class _BoundedLoop:
    """The iterable of a `for` loop, checking the clock on every step; keeps the length of what
    it wraps, so the loop's `loop.length` is computed as without it."""

    __slots__ = ("_budget", "_values")

    def __init__(self, values: Iterable[Any], budget: RenderBudget) -> None:
        self._values = values
        self._budget = budget

    def __iter__(self) -> Iterator[Any]:
        for value in self._values:
            self._budget.tick()
            yield value

    def __len__(self) -> int:
        return len(self._values)  # type: ignore[arg-type]


def _bounded_loop(values: Iterable[Any]) -> _BoundedLoop:
    return _BoundedLoop(values, _budget())


def _check_comparable(values: Iterable[Any], budget: RenderBudget, what: str) -> None:
    """Fail for containers too large to compare or hash: their elements are visited once
    for each path to them, which for shared elements can be exponentially many."""
    for value in values:
        if isinstance(value, (list, tuple, dict, set, frozenset, Namespace)):
            text_length(value, budget, what=what)


def _bounded_operand(value: Any) -> Any:
    """An operand of a comparison or a dict key, checked to be comparable in bounded time."""
    _check_comparable((value,), _budget(), "a comparison")
    return value


def _bounded_test(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        _check_comparable((*args, *kwargs.values()), budget, f"the {name} test")
        return function(*args, **kwargs)

    return bounded


# --- size estimates of the operations that can allocate far more than their inputs ---------

_PRINTF_SPEC = re.compile(r"%(?:\([^)]*\))?[-#0 +]*(\*|\d+)?(?:\.(\*|\d+))?[hlL]?[a-zA-Z%]")
_NUMBER = re.compile(r"\d+")


def _widest(numbers: Iterable[str]) -> int:
    return max((int(n) if len(n) < 20 else sys.maxsize for n in numbers), default=0)


def _printf_bytes(fmt: str | bytes, args: Any, budget: RenderBudget) -> int:
    """Bytes of `fmt % args`."""
    text = fmt.decode("latin-1") if isinstance(fmt, bytes) else fmt
    if isinstance(args, Mapping):
        values = list(args.values())
    elif isinstance(args, tuple):
        values = list(args)
    else:
        values = [args]
    star = max((abs(v) for v in values if isinstance(v, int)), default=0)
    specs = _PRINTF_SPEC.findall(text)
    width = 0
    for spec in specs:
        for part in spec:
            width = max(width, star if part == "*" else _widest([part] if part else []))
    longest = max((text_length(v, budget) for v in values), default=0)
    return len(text) + len(specs) * max(width, longest) * 4


def _format_bytes(
    fmt: str, args: tuple[Any, ...], kwargs: Mapping[str, Any], b: RenderBudget
) -> int:
    """Bytes of `fmt.format(*args, **kwargs)`."""
    fields = list(string.Formatter().parse(fmt))
    values = [*args, *kwargs.values()]
    width = 0
    for _, _, spec, _ in fields:
        if spec:
            width = max(width, _widest(_NUMBER.findall(spec)))
            if "{" in spec:
                width = max(width, max((abs(v) for v in values if isinstance(v, int)), default=0))
    longest = max((text_length(v, b) for v in values), default=0)
    return len(fmt) + len(fields) * max(width, longest) * 4


def _replace_bytes(text: str | bytes, old: Any, new: Any, count: int = -1) -> int:
    if not isinstance(old, type(text)) or not isinstance(new, type(text)):
        return 0
    hits = len(text) + 1 if not old else text.count(old)
    if isinstance(count, int) and count >= 0:
        hits = min(hits, count)
    return (len(text) + hits * max(len(new), 1)) * _char_bytes(text) * 2


def _split_bytes(text: str | bytes, sep: Any = None, *_: Any, **__: Any) -> int:
    separated = isinstance(sep, type(text)) and sep
    pieces = text.count(sep) + 1 if separated else len(text) // 2 + 1
    return pieces * _OBJECT_BYTES + len(text) * _char_bytes(text)


def _width_bytes(text: str | bytes, width: Any = 0, *_: Any, **__: Any) -> int:
    return max(len(text), width if isinstance(width, int) else 0) * 4


def _expandtabs_bytes(text: str | bytes, tabsize: Any = 8) -> int:
    size = tabsize if isinstance(tabsize, int) else 8
    return (len(text) + text.count("\t" if isinstance(text, str) else b"\t") * size) * 4


def _translate_bytes(text: str | bytes, table: Any, *_: Any) -> int:
    longest = 1
    if isinstance(table, Mapping):
        longest = max((len(v) for v in table.values() if isinstance(v, str)), default=1)
    return len(text) * longest * 4


def _join_bytes(sep: str | bytes, items: list[Any], budget: RenderBudget) -> int:
    return (sum(text_length(i, budget, escaped=False) for i in items) + len(sep) * len(items)) * 4


def _str_method_bytes(
    owner: str | bytes, name: str, args: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget
) -> int:
    """Bytes a call of the str or bytes method `name` can allocate."""
    if name in ("center", "ljust", "rjust", "zfill"):
        return _width_bytes(owner, *args, **kwargs)
    if name == "expandtabs":
        return _expandtabs_bytes(owner, *args, **kwargs)
    if name == "replace":
        return _replace_bytes(owner, *args, **kwargs)
    if name in ("split", "rsplit", "splitlines"):
        return _split_bytes(owner, *args, **kwargs) if name != "splitlines" else _split_bytes(owner)
    if name == "translate":
        return _translate_bytes(owner, *args)
    if name == "format" and isinstance(owner, str):
        return _format_bytes(owner, args, kwargs, b)
    if name == "format_map" and isinstance(owner, str) and args and isinstance(args[0], Mapping):
        return _format_bytes(owner, (), args[0], b)
    # Case mappings and encodings grow text by a small factor at most.
    return len(owner) * 4 * 3


def _materialized(values: Any, budget: RenderBudget) -> Any:
    """`values` as a list where it is an iterator (each step checked), else itself."""
    if not _is_iterator(values):
        return values
    return list(_iterated(values, budget, "an iteration"))


_ITERATING_FILTERS = frozenset(
    {"list", "map", "select", "reject", "selectattr", "rejectattr", "unique", "sort", "groupby"}
    | {"sum", "min", "max", "join"}
)
# Filters `_specific_filter_bytes` has an estimate for.
_ESTIMATED_FILTERS = (
    frozenset({"center", "indent", "format", "replace", "wordwrap", "tojson", "pprint", "string"})
    | frozenset({"batch", "slice"})
    | _COMPARING_FILTERS
    | _ITERATING_FILTERS
)


def _is_iterator(value: Any) -> bool:
    # What `isinstance(value, Iterator)` says, without the cost of an ABC check on every call.
    return hasattr(type(value), "__next__")


def _filter_bytes(name: str, args: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget) -> int:
    """Bytes the filter `name` can allocate for these arguments (the value first)."""
    value = args[0] if args else None
    rest = args[1:]
    if name not in _ESTIMATED_FILTERS:
        return _inserting_bytes(value, rest, kwargs)
    return max(
        _inserting_bytes(value, rest, kwargs), _specific_filter_bytes(name, value, rest, kwargs, b)
    )


def _inserting_bytes(value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any]) -> int:
    """Bytes of a filter on a string that inserts its other string arguments anywhere in it."""
    if not isinstance(value, str):
        return 0
    inserted = sum(len(a) for a in (*rest, *kwargs.values()) if isinstance(a, str))
    return (len(value) + 1) * (2 + inserted) * 4


def _specific_filter_bytes(
    name: str, value: Any, rest: tuple[Any, ...], kwargs: dict[str, Any], b: RenderBudget
) -> int:
    if name == "center":
        width = rest[0] if rest else kwargs.get("width", 80)
        return _width_bytes(str(value) if isinstance(value, str) else "", width)
    if name == "indent" and isinstance(value, str):
        width = rest[0] if rest else kwargs.get("width", 4)
        pad = len(width) if isinstance(width, str) else width if isinstance(width, int) else 0
        return (len(value) + (value.count("\n") + 1) * pad) * 4
    if name == "format" and isinstance(value, str):
        return _printf_bytes(value, kwargs if kwargs else tuple(rest), b)
    if name == "replace" and isinstance(value, str) and len(rest) >= 2:
        return _replace_bytes(value, *rest[:2], *(rest[2:3] or [kwargs.get("count", -1)]))
    if name == "wordwrap" and isinstance(value, str):
        wrap = kwargs.get("wrapstring", rest[2] if len(rest) > 2 else None)
        return len(value) * (2 + (len(wrap) if isinstance(wrap, str) else 1)) * 4
    if name in ("tojson", "pprint", "string"):
        indent = kwargs.get("indent", rest[1] if name == "tojson" and len(rest) > 1 else None)
        step = len(indent) if isinstance(indent, str) else indent if isinstance(indent, int) else 0
        return text_length(value, b, indent=max(step, 0) + 1) * 4
    if name == "sum" and isinstance(value, (list, tuple)):
        # Summing sequences copies the growing total once per item.
        sizes = [len(v) for v in value if isinstance(v, (str, bytes, list, tuple))]
        return len(sizes) * sum(sizes) * 8
    if name in _COMPARING_FILTERS:
        _check_comparable((value,), b, f"the {name} filter")
    if name in ("batch", "slice"):
        count = rest[0] if rest else kwargs.get("linecount", kwargs.get("slices", 0))
        return (count if isinstance(count, int) else 0) * _OBJECT_BYTES
    if isinstance(value, str) and name in _ITERATING_FILTERS:
        # Iterating a string makes an object of every character.
        return len(value) * _OBJECT_BYTES
    return 0


def _bounded_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    passes_context = hasattr(function, "jinja_pass_arg")

    @functools.wraps(function)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _budget()
        budget.tick()
        values = args[1:] if passes_context else args
        if values:
            values = (_materialized(values[0], budget), *values[1:])
        what = f"the {name} filter"
        budget.require(_filter_bytes(name, values, kwargs, budget), what)
        if name == "join" and values:
            items = list(values[0].values() if isinstance(values[0], Mapping) else values[0])
            sep = values[1] if len(values) > 1 else kwargs.get("d", "")
            if isinstance(sep, str):
                budget.require(_join_bytes(sep, items, budget), what)
        result = function(*(args[:1] if passes_context else ()), *values, **kwargs)
        if _is_iterator(result):
            return _iterated(result, budget, what)
        budget.charge(_footprint(result), what)
        return result

    return bounded


def _filtered(expr: nodes.Expr, name: str) -> nodes.Filter:
    return nodes.Filter(expr, name, [], [], None, None, lineno=expr.lineno)


class _BoundedCodeGenerator(CodeGenerator):
    """Jinja's code generator, with every `for` loop's iterable and every `~` bounded."""

    def visit_Template(self, node: nodes.Template, frame: Frame | None = None) -> None:
        for loop in node.find_all(nodes.For):
            loop.iter = _filtered(loop.iter, _LOOP_FILTER)
        for compare in node.find_all(nodes.Compare):
            compare.expr = _filtered(compare.expr, _OPERAND_FILTER)
            for operand in compare.ops:
                operand.expr = _filtered(operand.expr, _OPERAND_FILTER)
        for pair in node.find_all(nodes.Pair):
            pair.key = _filtered(pair.key, _OPERAND_FILTER)
        super().visit_Template(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.concat_text((")
        for arg in node.nodes:
            self.visit(arg, frame)
            self.write(", ")
        self.write("))")


def _binop(op: str) -> Callable[[Any, Any], Any]:
    return {
        "*": operator.mul,
        "+": operator.add,
        "%": operator.mod,
        "**": operator.pow,
    }[op]


def _binop_bytes(op: str, left: Any, right: Any, budget: RenderBudget) -> int:
    """Bytes `left op right` allocates; fails for integers past the limit."""
    if op == "*":
        if isinstance(left, int) and isinstance(right, int):
            _limit_integer(abs(left).bit_length() + abs(right).bit_length(), "a multiplication")
            return 0
        sequence, times = (left, right) if isinstance(right, int) else (right, left)
        if isinstance(sequence, (str, bytes, list, tuple)) and isinstance(times, int):
            unit = _char_bytes(sequence) if isinstance(sequence, (str, bytes)) else 8
            return len(sequence) * max(times, 0) * unit
        return 0
    if op == "+":
        if isinstance(left, (str, bytes)) and isinstance(right, (str, bytes)):
            return (len(left) + len(right)) * max(_char_bytes(left), _char_bytes(right))
        if isinstance(left, (list, tuple)) and isinstance(right, (list, tuple)):
            return (len(left) + len(right)) * 8
        return 0
    if op == "%" and isinstance(left, (str, bytes)):
        return _printf_bytes(left, right, budget)
    powered = op == "**" and isinstance(left, int) and isinstance(right, int)
    if powered and right > 0 and abs(left) > 1:
        _limit_integer(abs(left).bit_length() * right, "a power")
    return 0


class BoundedSandbox(ImmutableSandboxedEnvironment):
    """Jinja's immutable sandbox with every render bounded by `pygemma4.template_limits`
    (rendered through `render_bounded`)."""

    code_generator_class = _BoundedCodeGenerator
    intercepted_binops = frozenset({"*", "+", "%", "**"})

    def __init__(self, **options: Any) -> None:
        super().__init__(finalize=self._finalize, **options)
        for name, function in list(self.filters.items()):
            self.filters[name] = _bounded_filter(name, function)
        self.filters[_LOOP_FILTER] = _bounded_loop
        self.filters[_OPERAND_FILTER] = _bounded_operand
        for name in _COMPARING_TESTS & set(self.tests):
            self.tests[name] = _bounded_test(name, self.tests[name])

    def add_filter(self, name: str, function: Callable[..., Any]) -> None:
        """Install a filter, bounded as the built-in ones are."""
        self.filters[name] = _bounded_filter(name, function)

    def call_binop(self, context: Context, operator: str, left: Any, right: Any) -> Any:
        budget = _budget()
        budget.tick()
        what = f"the {operator} operator"
        budget.require(_binop_bytes(operator, left, right, budget), what)
        result = _binop(operator)(left, right)
        budget.charge(_footprint(result), what)
        return result

    def call(__self, __context: Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        budget = _budget()
        budget.tick()
        target = inspect.unwrap(__obj) if hasattr(__obj, "__wrapped__") else __obj
        owner = getattr(target, "__self__", None)
        name = getattr(target, "__name__", "")
        what = f"a call of {name or type(__obj).__name__}"
        if isinstance(owner, (str, bytes)):
            if name == "join" and args:
                items = _materialized(args[0], budget)
                items = list(items.keys() if isinstance(items, Mapping) else items)
                budget.require(_join_bytes(owner, items, budget), what)
                args = (items, *args[1:])
            else:
                budget.require(_str_method_bytes(owner, name, args, kwargs, budget), what)
        elif isinstance(owner, int) and name == "to_bytes":
            length = args[0] if args else kwargs.get("length", 1)
            budget.require(length if isinstance(length, int) else 0, what)
        elif target is generate_lorem_ipsum:
            n = args[0] if args else kwargs.get("n", 5)
            words = args[3] if len(args) > 3 else kwargs.get("max", 100)
            if isinstance(n, int) and isinstance(words, int):
                budget.require(n * words * 16, what)
        # Arguments may be hashed or compared (`dict.fromkeys`, `loop.changed`).
        _check_comparable((*args, *kwargs.values()), budget, what)
        if budget.depth >= limits.CALL_DEPTH:
            raise ChatTemplateLimitError(
                "CALL_DEPTH",
                f"the chat template's calls nest deeper than the limit of {limits.CALL_DEPTH} "
                "(template_limits.CALL_DEPTH)",
            )
        budget.depth += 1
        try:
            result = super().call(__context, __obj, *args, **kwargs)
        finally:
            budget.depth -= 1
        budget.charge(_footprint(result), what)
        return result

    def concat(self, pieces: Iterable[str]) -> str:  # type: ignore[override]
        """The text of a render, block or macro: its pieces joined, within the output limit."""
        budget = _budget()
        parts = []
        length = 0
        for piece in pieces:
            budget.tick()
            parts.append(piece)
            length += len(piece)
            _limit_output(length, "the chat template")
        budget.charge(length * 4 if length else 0, "the chat template's text")
        return "".join(parts)

    def concat_text(self, values: tuple[Any, ...]) -> str:
        """`a ~ b ~ ...`: the values as text, joined."""
        budget = _budget()
        budget.tick()
        length = sum(text_length(v, budget, escaped=not isinstance(v, str)) for v in values)
        budget.require(length * 4, "the ~ operator")
        result = "".join(map(str, values))
        budget.charge(_footprint(result), "the ~ operator")
        return result

    @staticmethod
    def _finalize(value: Any) -> Any:
        budget = _active.get()
        if budget is not None:
            budget.tick()
            length = text_length(value, budget, escaped=not isinstance(value, str))
            _limit_output(length, "one output of the chat template")
            budget.require(length * 4, "the text of an output")
        return value
