"""Hostile chat templates: a model file's template is code that runs on every chat request, so
each render must stay within `pygemma4.template_limits` and fail with a ChatTemplateLimitError
naming the limit, within 2 s and 512 MB, wherever templates render: the engine's tokenizer, the
CLI, and a real server's workers (ZeroMQ and HTTP), which answer the request with an error and
keep serving. The sandbox must also keep templates away from files, imports and internals.

Every hostile template is one branch of a single template written into a real GGUF copy of the
demo model, chosen by the user message's text, so one file and one server serve the whole table.
Renders that could go wrong run in subprocesses whose address space is capped at 1 GiB, so that a
failure cannot take the machine down.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from conftest import rewrite_gguf
from serve_helpers import ServeProcess, free_port

from pygemma4 import template_limits
from pygemma4.chat import ChatTemplate
from pygemma4.client import ServerError
from pygemma4.errors import ChatTemplateError, ChatTemplateLimitError

ADDRESS_SPACE_BYTES = 2**30
SECONDS_BAR = 2.0
MEMORY_BAR_BYTES = 512 * 2**20

# case -> (template body, the limit it must hit)
HOSTILE: dict[str, tuple[str, str]] = {
    "string-repetition": ("{{ 'x' * 10000000000 }}", "ALLOCATION_BYTES"),
    "list-repetition": ("{{ ([0] * 10000000000)|length }}", "ALLOCATION_BYTES"),
    "range-product": ("{{ (range(99999)|list) * 99999 }}", "ALLOCATION_BYTES"),
    "nested-loops": (
        "{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
        "RENDER_SECONDS",
    ),
    "silent-nested-loops": (
        "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
        "RENDER_SECONDS",
    ),
    "macro-recursion": ("{{ recurse(0) }}", "CALL_DEPTH"),
    "recursive-loop": (
        "{% for x in [[1]] recursive %}{{ loop([x]) }}{% endfor %}",
        "CALL_DEPTH",
    ),
    "huge-join": ("{{ (['y' * 1000000] * 100)|join }}", "ALLOCATION_BYTES"),
    "join-method": ("{{ ''.join(['y' * 1000000] * 100) }}", "ALLOCATION_BYTES"),
    "center-filter": ("{{ 'x'|center(10**10) }}", "ALLOCATION_BYTES"),
    "center-method": ("{{ 'x'.center(10**10) }}", "ALLOCATION_BYTES"),
    "printf-width": ("{{ '%10000000000s'|format('x') }}", "ALLOCATION_BYTES"),
    "printf-precision": ("{{ '%.999999999f' % 1.5 }}", "ALLOCATION_BYTES"),
    "printf-star-width": ("{{ '%*s' % (10**10, 'x') }}", "ALLOCATION_BYTES"),
    "format-width": ("{{ '{:>9999999999}'.format(1) }}", "ALLOCATION_BYTES"),
    "replace-growth": ("{{ ('x' * 1000000)|replace('x', 'y' * 1000) }}", "ALLOCATION_BYTES"),
    "replace-empty": ("{{ ('x' * 1000000).replace('', 'y' * 1000) }}", "ALLOCATION_BYTES"),
    "tojson-huge": ("{{ (['z' * 1000000] * 1000)|tojson }}", "ALLOCATION_BYTES"),
    "tojson-indent": ("{{ [[[1]]]|tojson(indent=10**9) }}", "ALLOCATION_BYTES"),
    "tilde-doubling": (
        "{% set ns = namespace(s='ab') %}{% for i in range(99999) %}"
        "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}",
        "ALLOCATION_BYTES",
    ),
    "list-growth": (
        "{% set ns = namespace(l=[]) %}{% for i in range(99999) %}"
        "{% set ns.l = ns.l + [i|string * 1000] %}{% endfor %}{{ ns.l|length }}",
        "ALLOCATION_BYTES",
    ),
    "dict-growth": (
        "{% set ns = namespace(d={}) %}{% for i in range(99999) %}"
        "{% set ns.d = dict(ns.d, **{'k' ~ i: 'v' * 1000}) %}{% endfor %}{{ ns.d|length }}",
        "ALLOCATION_BYTES",
    ),
    "integer-power": ("{{ 2 ** 100000000 }}", "INTEGER_BITS"),
    "integer-squaring": (
        "{% set ns = namespace(x=3) %}{% for i in range(100) %}"
        "{% set ns.x = ns.x * ns.x %}{% endfor %}{{ ns.x > 0 }}",
        "INTEGER_BITS",
    ),
    "output-flood": (
        "{% for i in range(99999) %}{{ 'x' * 1000 }}{% endfor %}",
        "OUTPUT_CHARACTERS",
    ),
    "indent-filter": ("{{ ('a\n' * 100000)|indent(100000) }}", "ALLOCATION_BYTES"),
    "split-explosion": ("{{ ('ab,' * 10000000).split(',')|length }}", "ALLOCATION_BYTES"),
    "expandtabs": ("{{ ('\t' * 1000000).expandtabs(100000) }}", "ALLOCATION_BYTES"),
    "lipsum": ("{{ lipsum(100000, max=100000) }}", "ALLOCATION_BYTES"),
    "to-bytes": ("{{ (1).to_bytes(10**10, 'big') }}", "ALLOCATION_BYTES"),
    "batch-fill": ("{{ [1]|batch(10**9, 'x')|list|length }}", "ALLOCATION_BYTES"),
    "wordwrap-insert": (
        "{{ ('a ' * 1000000)|wordwrap(1, wrapstring='y' * 100000) }}",
        "ALLOCATION_BYTES",
    ),
    "shared-compare": (
        "{% set ns = namespace(x=[1], y=[1]) %}{% for i in range(200) %}"
        "{% set ns.x = [ns.x, ns.x] %}{% set ns.y = [ns.y, ns.y] %}{% endfor %}"
        "{{ ns.x == ns.y }}",
        "RENDER_SECONDS",
    ),
    "shared-hash": (
        "{% set ns = namespace(t=(1,)) %}{% for i in range(200) %}"
        "{% set ns.t = (ns.t, ns.t) %}{% endfor %}{{ dict.fromkeys([ns.t])|length }}",
        "RENDER_SECONDS",
    ),
    "shared-unique": (
        "{% set ns = namespace(t=(1,)) %}{% for i in range(200) %}"
        "{% set ns.t = (ns.t, ns.t) %}{% endfor %}{{ [ns.t, ns.t]|unique|list|length }}",
        "RENDER_SECONDS",
    ),
    "sum-of-lists": ("{{ ([[0] * 10000] * 1000)|sum(start=[])|length }}", "ALLOCATION_BYTES"),
    "caller-doubling": (
        "{% macro twice() %}{{ caller() }}{{ caller() }}{% endmacro %}"
        "{% call twice() %}{% call twice() %}{{ 'x' * 5000000 }}{% endcall %}{% endcall %}",
        "OUTPUT_CHARACTERS",
    ),
}

# Templates that try to leave the sandbox: each must fail, or render without reaching anything.
ESCAPES = {
    "subclasses": "{{ ''.__class__.__mro__[1].__subclasses__() }}",
    "include-file": "{% include '/etc/passwd' %}",
    "import-module": "{% import 'os' as os %}{{ os }}",
    "function-globals": "{{ raise_exception.__globals__ }}",
    "cycler-globals": "{{ cycler.__init__.__globals__.os }}",
    "format-attribute": "{{ '{0.__class__.__init__.__globals__}'.format('x') }}",
    "namespace-internals": "{% set ns = namespace() %}{{ ns._Namespace__attrs }}",
    "list-append": "{% set l = [] %}{{ l.append(1) }}{{ l }}",
    "dict-update": "{% set d = {} %}{{ d.update({'a': 1}) }}{{ d }}",
    "self-context": "{{ self._TemplateReference__context }}",
}
LEAKS = ("<class", "<function", "<module", "built-in", "root:")

BENIGN = "benign"


def dispatching_template() -> str:
    """One chat template: the hostile case named by the last message's text, else a plain turn."""
    cases = "".join(
        f"{{%- elif case == {name!r} -%}}{body}"
        for name, (body, _) in (HOSTILE | {n: (b, "") for n, b in ESCAPES.items()}).items()
    )
    return (
        "{%- macro recurse(n) -%}{{ recurse(n + 1) }}{%- endmacro -%}"
        "{%- set case = messages[-1]['content'] -%}"
        "{%- if false -%}" + cases + "{%- else -%}"
        "{{ bos_token }}<|turn>user\n{{ case }}<turn|>\n<|turn>model\n"
        "{%- endif -%}"
    )


@pytest.fixture(scope="module")
def hostile_model(demo_model_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real GGUF copy of the demo model whose chat template holds every hostile case."""
    target = tmp_path_factory.mktemp("hostile") / "demo-hostile-template.gguf"
    return rewrite_gguf(
        demo_model_file, target, {"tokenizer.chat_template": dispatching_template()}
    )


def cap_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_BYTES, ADDRESS_SPACE_BYTES))


# Renders every case through the engine's tokenizer, timing each; prints one JSON object.
ENGINE_SCRIPT = """
import json, sys, time
from pygemma4 import Engine
from pygemma4.errors import ChatTemplateError

def peak_rss_bytes():
    # This process's own high-water mark (VmHWM starts afresh at exec; getrusage's maxrss
    # would carry over the forking test process's).
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) * 1024


engine = Engine(sys.argv[1], threads=1)
results = {}
for case in json.loads(sys.argv[2]):
    start = time.monotonic()
    try:
        ids = engine.tokenizer.encode_chat([{"role": "user", "content": case}])
        outcome = {"rendered": engine.tokenizer.decode(ids)}
    except ChatTemplateError as e:
        outcome = {"error": type(e).__name__, "limit": getattr(e, "limit", None), "message": str(e)}
    outcome["seconds"] = time.monotonic() - start
    outcome["peak_rss_bytes"] = peak_rss_bytes()
    results[case] = outcome
print(json.dumps(results))
"""


@pytest.fixture(scope="module")
def engine_results(hostile_model: Path) -> dict[str, dict[str, Any]]:
    cases = [*HOSTILE, *ESCAPES, BENIGN]
    done = subprocess.run(
        [sys.executable, "-c", ENGINE_SCRIPT, str(hostile_model), json.dumps(cases)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=cap_address_space,
        cwd=hostile_model.parent,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_engine_refuses_hostile_template_naming_the_limit(
    engine_results: dict[str, dict[str, Any]], case: str
) -> None:
    outcome = engine_results[case]
    limit = HOSTILE[case][1]
    assert outcome.get("error") == "ChatTemplateLimitError", outcome
    assert outcome["limit"] == limit
    assert f"template_limits.{limit}" in outcome["message"]
    assert outcome["seconds"] < SECONDS_BAR, outcome
    assert outcome["peak_rss_bytes"] < MEMORY_BAR_BYTES, outcome


@pytest.mark.parametrize("case", sorted(ESCAPES))
def test_sandbox_holds(engine_results: dict[str, dict[str, Any]], case: str) -> None:
    outcome = engine_results[case]
    if "error" in outcome:
        assert outcome["error"] == "ChatTemplateError", outcome
    else:
        assert not any(leak in outcome["rendered"] for leak in LEAKS), outcome


def test_benign_request_renders_after_hostile_ones(
    engine_results: dict[str, dict[str, Any]],
) -> None:
    assert engine_results[BENIGN]["rendered"] == f"<|turn>user\n{BENIGN}<turn|>\n<|turn>model"


def test_table_covers_every_limit_of_a_render() -> None:
    limits = {name for name in vars(template_limits) if name.isupper()}
    assert {limit for _, limit in HOSTILE.values()} == limits - {"SOURCE_CHARACTERS"}


def test_source_longer_than_the_limit_is_refused() -> None:
    source = "x" * (template_limits.SOURCE_CHARACTERS + 1)
    with pytest.raises(ChatTemplateLimitError, match="SOURCE_CHARACTERS") as caught:
        ChatTemplate(source)
    assert caught.value.limit == "SOURCE_CHARACTERS"


def test_deeply_nested_source_is_refused_clearly() -> None:
    with pytest.raises(ChatTemplateError, match="nests too deeply"):
        ChatTemplate("{{ " + "(" * 100000 + "1" + ")" * 100000 + " }}")


def test_limits_leave_large_ordinary_conversations_alone() -> None:
    """A long conversation through a template that rebuilds its text in a loop stays well within
    the limits."""
    template = ChatTemplate(
        "{%- set ns = namespace(text='') -%}{%- for m in messages -%}"
        "{%- set ns.text = ns.text ~ '<|turn>' ~ m.role ~ '\n' ~ m.content|trim ~ '<turn|>\n' -%}"
        "{%- endfor -%}{{ ns.text|replace('\r', '') }}{{ messages|tojson|length }}"
    )
    messages = [{"role": "user", "content": f"message {i} " + "word " * 2000} for i in range(50)]
    text = template.render(messages)
    assert text.count("<turn|>") == 50


# --- the CLI --------------------------------------------------------------------------------

CLI_CASES = [
    "string-repetition",
    "nested-loops",
    "macro-recursion",
    "output-flood",
    "center-filter",
]


@pytest.mark.parametrize("case", CLI_CASES)
def test_cli_generate_fails_clearly(hostile_model: Path, tmp_path: Path, case: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "pygemma4", "generate", str(hostile_model), case, "--chat"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
        preexec_fn=cap_address_space,
        check=False,
    )
    limit = HOSTILE[case][1]
    assert done.returncode != 0
    assert f"template_limits.{limit}" in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr


# --- a real server: ZeroMQ and HTTP ---------------------------------------------------------


@pytest.fixture(scope="module")
def hostile_server(
    hostile_model: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[ServeProcess]:
    listen = f"127.0.0.1:{free_port()}"
    workdir = tmp_path_factory.mktemp("serve")
    with ServeProcess.running(hostile_model, workdir, "--threads", "1", "--http", listen) as serve:
        serve.base_url = f"http://{listen}"  # type: ignore[attr-defined]
        yield serve


def test_server_answers_each_hostile_template_with_an_error_and_keeps_serving(
    hostile_server: ServeProcess,
) -> None:
    workers_before = {w.pid for w in hostile_server.health().workers}
    with hostile_server.client(timeout=60) as client:
        for case, (_, limit) in HOSTILE.items():
            with pytest.raises(ServerError, match=f"template_limits.{limit}"):
                client.chat([{"role": "user", "content": case}], max_tokens=1)
        reply = client.chat([{"role": "user", "content": BENIGN}], max_tokens=2, temperature=0)
    assert reply.finish_reason in ("length", "stop")
    assert {w.pid for w in hostile_server.health().workers} == workers_before


@pytest.mark.parametrize("case", ["string-repetition", "nested-loops", "macro-recursion"])
def test_http_chat_and_tokenize_answer_hostile_templates_with_400(
    hostile_server: ServeProcess, case: str
) -> None:
    base = hostile_server.base_url  # type: ignore[attr-defined]
    messages = [{"role": "user", "content": case}]
    limit = HOSTILE[case][1]
    with httpx.Client(base_url=base, timeout=60) as http:
        request = {"model": hostile_server.model.name, "messages": messages, "max_tokens": 1}
        chat = http.post("/v1/chat/completions", json=request)
        tokenize = http.post("/tokenize", json={"messages": messages})
        health = http.get("/health")
    for reply in (chat, tokenize):
        assert reply.status_code == 400, reply.text
        assert f"template_limits.{limit}" in reply.json()["error"]["message"]
    assert health.status_code == 200
