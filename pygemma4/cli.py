"""The `pygemma4` command line."""

from __future__ import annotations

import functools
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

import click

from pygemma4.errors import Gemma4Error, SamplingParamsError

if TYPE_CHECKING:
    from rich.progress import Progress

    from pygemma4.benchmark.load import RequestRecord
    from pygemma4.generation import GenerationChunk
    from pygemma4.sampling import SampledToken
    from pygemma4.tokenizer import Tokenizer

DEMO_NOTICE = "demo model (random weights: its text is noise): {path}"


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _runs_cleanly(command: Callable[..., None]) -> Callable[..., None]:
    """Report expected failures (bad files, bad input) as one line and exit 1, no traceback."""

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> None:
        try:
            command(*args, **kwargs)
        except (Gemma4Error, OSError) as e:
            _fail(str(e))
        except KeyboardInterrupt:
            click.echo("\ninterrupted", err=True)
            sys.exit(130)

    return wrapper


# One option per SamplingParams field, named after it; greedy unless --temperature says otherwise.
_SAMPLING_OPTIONS = (
    click.option("--temperature", default=0.0, type=float, help="0 picks the likeliest token."),
    click.option("--top-k", default=0, type=int, help="Keep the k likeliest tokens (0: all)."),
    click.option("--top-p", default=1.0, type=float, help="Keep the likeliest up to this mass."),
    click.option("--min-p", default=0.0, type=float, help="Drop tokens below this × the top."),
    click.option("--repetition-penalty", default=1.0, type=float),
    click.option("--presence-penalty", default=0.0, type=float),
    click.option("--frequency-penalty", default=0.0, type=float),
    click.option("--seed", type=int, help="Seed for sampling [default: random]."),
    click.option("--stop", multiple=True, help="Stop before this text (repeatable)."),
    click.option("--logprobs", default=0, type=int, help="Show the top-N log-probabilities."),
)


def _sampling_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add the sampling options to a command; they arrive as keyword arguments named after
    the SamplingParams fields."""
    for option in reversed(_SAMPLING_OPTIONS):
        command = option(command)
    return command


def _backend_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --backend and --device; they arrive as keyword arguments of those names."""
    command = click.option(
        "--device", default=0, type=click.IntRange(min=0), help="CUDA device (with --backend cuda)."
    )(command)
    return click.option(
        "--backend", default="cpu", type=click.Choice(["cpu", "cuda"]), help="Where to compute."
    )(command)


def _max_image_tokens_option(command: Callable[..., None]) -> Callable[..., None]:
    """Add --max-image-tokens (the image budgets Gemma 4's processor knows, as text: the
    command converts it with int)."""
    return click.option(
        "--max-image-tokens",
        default="280",
        type=click.Choice(["70", "140", "280", "560", "1120"]),
        help="Soft tokens per image at most (with --mmproj).",
    )(command)


def _kv_dtype_option(command: Callable[..., None]) -> Callable[..., None]:
    """Add --kv-dtype; it arrives as the keyword argument kv_dtype (None: the backend's
    default). A name the engine does not know is refused by it, naming the accepted ones."""
    return click.option(
        "--kv-dtype",
        metavar="f32|f16|bf16|q8_0",
        help="Type of the KV cache's entries [default: f16 on the CPU, f32 on CUDA].",
    )(command)


def _draft_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --draft and --draft-tokens; they arrive as keyword arguments of those names."""
    command = click.option(
        "--draft-tokens",
        default=4,
        type=click.IntRange(min=1, max=16),
        help="Tokens drafted per step (with --draft).",
    )(command)
    return click.option(
        "--draft",
        metavar="FILE|ngram",
        help="Decode speculatively: drafts from a Gemma 4 assistant GGUF made for MODEL, or "
        "from the text so far (ngram: prompt lookup).",
    )(command)


def _api_key_options(command: Callable[..., None]) -> Callable[..., None]:
    """Add --api-key and --api-key-file."""
    command = click.option(
        "--api-key-file",
        type=click.Path(dir_okay=False, path_type=Path),
        help="Like --api-key, the key read from this file (kept off the command line).",
    )(command)
    return click.option("--api-key", help="Require `Authorization: Bearer KEY` on the HTTP API.")(
        command
    )


@click.group()
@click.version_option(package_name="pygemma4")
def main() -> None:
    """Gemma 4 GGUF inference with a C++ core."""


@main.command(context_settings={"show_default": True})
@click.argument("arguments", nargs=-1, required=True, metavar="[MODEL] PROMPT")
@click.option("--chat", is_flag=True, help="Send PROMPT as a user turn through the chat template.")
@click.option("--system", help="A system turn before PROMPT (with --chat).")
@click.option("--max-tokens", default=256, type=click.IntRange(min=1))
@_sampling_options
@click.option("--ignore-eos", is_flag=True, help="Go on past end-of-generation tokens.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@_backend_options
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: all].")
@click.option("--n-ctx", type=click.IntRange(min=1), help="Context length [default: 4096].")
@_kv_dtype_option
@_draft_options
@click.option(
    "--mmproj",
    type=click.Path(dir_okay=False, path_type=Path),
    help="MODEL's multimodal projector GGUF (needed for --image and --audio).",
)
@click.option(
    "--image",
    "images",
    multiple=True,
    metavar="FILE",
    help="An image (PNG, JPEG, WebP) before PROMPT in the user turn; repeatable; implies --chat.",
)
@click.option(
    "--audio",
    "clips",
    multiple=True,
    metavar="FILE",
    help="A WAV clip (up to 30 s) after the images, before PROMPT; repeatable; implies --chat.",
)
@_max_image_tokens_option
@_runs_cleanly
def generate(
    arguments: tuple[str, ...],
    mmproj: Path | None,
    images: tuple[str, ...],
    clips: tuple[str, ...],
    max_image_tokens: str,
    chat: bool,
    system: str | None,
    max_tokens: int,
    ignore_eos: bool,
    as_json: bool,
    backend: str,
    device: int,
    threads: int | None,
    n_ctx: int | None,
    kv_dtype: str | None,
    draft: str | None,
    draft_tokens: int,
    **sampling_options: Any,
) -> None:
    """Continue PROMPT with MODEL (a Gemma 4 GGUF) and stream the text as it comes.

    Without MODEL the built-in demo model runs (random weights: it shows the engine working,
    its text is noise). PROMPT `-` reads the prompt from standard input.
    """
    from pygemma4.engine import Engine
    from pygemma4.generation import room_for_tokens
    from pygemma4.multimodal import Prompt
    from pygemma4.sampling import SamplingParams

    if len(arguments) > 2:
        raise click.UsageError("expected [MODEL] PROMPT: quote a prompt that has spaces")
    model, prompt = (None, arguments[0]) if len(arguments) == 1 else arguments
    for option, given in (("--image", images), ("--audio", clips)):
        if given and mmproj is None:
            raise click.UsageError(f"{option} needs --mmproj FILE (the model's projector)")
    chat = chat or bool(images) or bool(clips)
    if system is not None and not chat:
        raise click.UsageError("--system needs --chat")
    try:
        sampling = SamplingParams.from_mapping(sampling_options)
    except SamplingParamsError as e:
        raise click.UsageError(str(e)) from None
    if prompt == "-":
        try:
            prompt = sys.stdin.buffer.read().decode("utf-8")
        except UnicodeDecodeError as e:
            _fail(f"standard input is not UTF-8 text: {e.reason} at byte {e.start}")
    model_path = _model_path(model)
    engine = Engine(
        model_path,
        backend=backend,
        device=device,
        threads=threads,
        n_ctx=n_ctx,
        kv_dtype=kv_dtype,
        draft=draft,
        draft_tokens=draft_tokens,
        mmproj=mmproj,
        max_image_tokens=int(max_image_tokens),
    )
    tokenizer = engine.tokenizer
    ids: list[int] | Prompt
    if chat:
        messages: list[dict[str, Any]] = (
            [{"role": "system", "content": system}] if system is not None else []
        )
        content = [{"type": "image", "image": image} for image in images]
        content += [{"type": "audio", "audio": clip} for clip in clips]
        messages.append(
            {"role": "user", "content": content + [{"type": "text", "text": prompt}]}
            if content
            else {"role": "user", "content": prompt}
        )
        ids = engine.prepare(messages)
    else:
        ids = tokenizer.encode(prompt)
    room = room_for_tokens(engine.n_ctx, len(ids))
    if room < 1:
        _fail(f"the prompt is {len(ids)} tokens, longer than the context of {engine.n_ctx}")
    if max_tokens > room:
        click.echo(f"note: --max-tokens lowered to {room} to fit the context", err=True)
        max_tokens = room

    start = time.perf_counter()
    first = None
    chunks = []
    stop_tokens = () if ignore_eos else None
    for chunk in engine.stream(ids, max_tokens, sampling, stop_tokens):
        first = time.perf_counter() if first is None else first
        chunks.append(chunk)
        if not as_json:
            click.echo(chunk.text, nl=False)
            sys.stdout.flush()
    end = time.perf_counter()
    assert first is not None  # a stream yields at least one chunk
    timings = {
        "prompt_tokens": len(ids),
        "generated_tokens": len(chunks),
        "prompt_tokens_per_s": len(ids) / (first - start),
        "generated_tokens_per_s": (len(chunks) - 1) / (end - first) if len(chunks) > 1 else None,
    }
    speculation = engine.speculation
    if as_json:
        result = {
            "text": "".join(c.text for c in chunks),
            "token_ids": [c.token_id for c in chunks],
            "finish_reason": chunks[-1].finish_reason,
            **timings,
        }
        if sampling.logprobs:
            result["logprobs"] = [_logprob_entry(tokenizer, c.sampled) for c in chunks]
        if speculation is not None:
            result["speculation"] = speculation.to_dict()
        click.echo(json.dumps(result, ensure_ascii=False))
        return
    click.echo()
    if sampling.logprobs:
        _print_logprobs(tokenizer, chunks)
    rate = timings["generated_tokens_per_s"]
    click.echo(
        f"[{len(chunks)} tokens, finish: {chunks[-1].finish_reason}; prompt {len(ids)} tokens "
        f"at {timings['prompt_tokens_per_s']:.1f} tokens/s"
        + (f", generation {rate:.1f} tokens/s" if rate is not None else "")
        + (
            f"; drafts kept {speculation.accepted}/{speculation.proposed}]"
            if speculation is not None
            else "]"
        ),
        err=True,
    )


@main.command()
@click.argument("model", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object for programs.")
@click.option("--tensors", is_flag=True, help="List every tensor.")
@click.option("--template", is_flag=True, help="Print the whole chat template.")
@_runs_cleanly
def inspect(model: Path, as_json: bool, tensors: bool, template: bool) -> None:
    """Describe MODEL: architecture, shapes, tensor types and sizes, tokenizer, template; or,
    for a projector (mmproj) file, its vision and audio encoders."""
    from pygemma4.gguf_file import read_gguf
    from pygemma4.mmproj import MMPROJ_ARCH
    from pygemma4.model_info import describe_mmproj, describe_model
    from pygemma4.model_report import print_mmproj_report, print_report

    is_mmproj = read_gguf(model).metadata.get("general.architecture") == MMPROJ_ARCH
    info = describe_mmproj(model) if is_mmproj else describe_model(model)
    if as_json:
        click.echo(json.dumps(info, ensure_ascii=False, indent=2))
    elif is_mmproj:
        print_mmproj_report(info, tensors=tensors)
    else:
        print_report(info, tensors=tensors, template=template)


@main.command(context_settings={"show_default": True})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option(
    "--endpoint",
    default="tcp://127.0.0.1:5555",
    help="Where clients connect (tcp://HOST:PORT or ipc://PATH); loopback unless told.",
)
@_backend_options
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: all].")
@click.option(
    "--max-batch", default=8, type=click.IntRange(min=1), help="Sequences decoded together."
)
@click.option(
    "--n-ctx",
    type=click.IntRange(min=1),
    help="Context per sequence [default: the model's, where the KV pool holds it].",
)
@click.option(
    "--prefill-chunk",
    default=256,
    type=click.IntRange(min=1),
    help="Prompt tokens computed per step, beside the running sequences' next tokens.",
)
@click.option(
    "--kv-tokens",
    type=click.IntRange(min=1),
    help="KV pool size in positions [default: what --kv-memory holds].",
)
@click.option(
    "--kv-memory",
    metavar="SIZE|FRACTION",
    help="KV pool size in memory (8GiB, 512MB) or as a fraction of the memory available "
    "(0.5) [default: 0.4 on the CPU, up to every sequence at the model's context; on CUDA "
    "max-batch × 4096 positions].",
)
@_kv_dtype_option
@click.option("--tokenizer-workers", default=1, type=click.IntRange(min=1))
@click.option(
    "--max-pending",
    default=256,
    type=click.IntRange(min=1),
    help="Requests in flight before 'busy'.",
)
@click.option(
    "--max-message-bytes",
    default=4 << 20,
    type=click.IntRange(min=1024),
    help="Largest client message and HTTP body.",
)
@click.option(
    "--max-pending-per-client",
    type=click.IntRange(min=1),
    help="Requests in flight from one connection (one HTTP client address) before 'busy' "
    "[default: 64].",
)
@click.option(
    "--max-prompt-tokens",
    type=click.IntRange(min=1),
    help="Tokens of one prompt, after the chat template [default: the context].",
)
@click.option(
    "--max-queued-tokens",
    type=click.IntRange(min=1),
    help="Prompt tokens of all requests waiting to start before 'busy' [default: 1048576].",
)
@click.option(
    "--max-stop-strings",
    type=click.IntRange(min=0),
    help="Stop strings of one request [default and most: 16].",
)
@click.option(
    "--max-stop-chars",
    type=click.IntRange(min=1),
    help="Characters of one stop string [default and most: 256].",
)
@click.option(
    "--max-logprobs",
    type=click.IntRange(min=0),
    help="Logprobs of alternatives per token of one request [default and most: 20].",
)
@click.option(
    "--curve-secret-key",
    type=click.Path(dir_okay=False),
    help="Require CURVE: the server's NAME.key_secret (see `pygemma4 keygen`).",
)
@click.option(
    "--curve-clients",
    type=click.Path(file_okay=False),
    help="With --curve-secret-key: the directory of admitted clients' NAME.key files.",
)
@click.option(
    "--http",
    default="127.0.0.1:8000",
    help="Where the OpenAI-compatible HTTP API listens (HOST:PORT), or 'off'.",
)
@_draft_options
@click.option(
    "--mmproj",
    type=click.Path(dir_okay=False, path_type=Path),
    help="MODEL's multimodal projector GGUF: chats may then hold images and audio.",
)
@_max_image_tokens_option
@_api_key_options
@_runs_cleanly
def serve(
    model: Path | None,
    endpoint: str,
    threads: int | None,
    http: str,
    api_key: str | None,
    api_key_file: Path | None,
    max_image_tokens: str,
    **options: Any,
) -> None:
    """Serve MODEL (a Gemma 4 GGUF; the demo model without one) to ZeroMQ clients and, over
    HTTP, to OpenAI API clients.

    Connect with `pygemma4.Client(ENDPOINT)` or `openai.OpenAI(base_url="http://HTTP/v1")`.
    Ctrl-C or SIGTERM stops every process.
    """
    import signal

    from rich.console import Console

    from pygemma4.protocol import ServeLimits
    from pygemma4.runner import default_threads
    from pygemma4.workers.server import Server

    if (options["curve_secret_key"] is None) != (options["curve_clients"] is None):
        raise click.UsageError("--curve-secret-key and --curve-clients go together")
    remote = endpoint.startswith("tcp://") and not _is_loopback(endpoint)
    if remote and options["curve_secret_key"] is None:
        click.echo(
            f"warning: {endpoint} accepts connections from other machines, unauthenticated "
            "(--curve-secret-key requires CURVE keys)",
            err=True,
        )
    key = _api_key(api_key, api_key_file)
    listen = None if http == "off" else _checked_listen(http, "--http", key)
    threads = default_threads() if threads is None else threads
    given = {f: options.pop(f) for f in ServeLimits.__struct_fields__}
    limits = ServeLimits.checked(**{f: v for f, v in given.items() if v is not None})
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # while loading: as Ctrl-C
    server = Server(
        _model_path(None if model is None else str(model)),
        limits=limits,
        endpoint=endpoint,
        threads=threads,
        http=listen,
        api_key=key,
        max_image_tokens=int(max_image_tokens),
        **options,
    )
    try:
        console = Console(stderr=True)
        with console.status("loading the model") as status:
            server.start(
                lambda ready, total: status.update(
                    f"loading the model: {ready}/{total} workers ready"
                )
            )
        click.echo(f"pygemma4 serving {server.config.model} on {endpoint}")
        layout = server.kv_layout
        click.echo(
            f"KV pool: {layout.n_blocks * layout.block_size} positions "
            f"({layout.nbytes / 2**30:.2f} GiB); context per sequence: {server.config.n_ctx}",
            err=True,
        )
        click.echo(server.kv_footprint.describe(layout), err=True)
        click.echo(f"connect with: pygemma4.Client({endpoint!r})", err=True)
        if options["mmproj"] is not None:
            info = server.frontend.info
            takes = [m for m, on in (("images", info.vision), ("audio", info.audio)) if on]
            click.echo(f"chats take {' and '.join(takes)} ({options['mmproj']})", err=True)
        if listen is not None:
            click.echo(f"OpenAI API on http://{listen}/v1", err=True)
        sys.stdout.flush()
        stop: list[int] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, lambda number, _frame: stop.append(number))
        server.serve(lambda: bool(stop))
    finally:
        server.close()
    click.echo("stopped", err=True)


@main.command(context_settings={"show_default": True})
@click.option(
    "--endpoint", default="tcp://127.0.0.1:5555", help="The pygemma4 server's ZeroMQ endpoint."
)
@click.option("--listen", default="127.0.0.1:8000", help="Where the HTTP API listens (HOST:PORT).")
@click.option(
    "--model",
    type=click.Path(dir_okay=False, path_type=Path),
    help="The served GGUF, for its tokenizer: /tokenize, /detokenize and logprobs' token texts.",
)
@click.option(
    "--curve-secret-key",
    type=click.Path(dir_okay=False),
    help="For a server that requires CURVE: this client's NAME.key_secret.",
)
@click.option(
    "--curve-server-key",
    type=click.Path(dir_okay=False),
    help="With --curve-secret-key: the server's public NAME.key.",
)
@_api_key_options
@_runs_cleanly
def http(
    endpoint: str,
    listen: str,
    model: Path | None,
    curve_secret_key: str | None,
    curve_server_key: str | None,
    api_key: str | None,
    api_key_file: Path | None,
) -> None:
    """Serve the OpenAI-compatible HTTP API in front of the pygemma4 server at ENDPOINT
    (`pygemma4 serve` runs one itself unless --http off)."""
    from pygemma4 import curve
    from pygemma4.tokenizer import Tokenizer
    from pygemma4.workers.http import ServerKeys, run

    if (curve_secret_key is None) != (curve_server_key is None):
        raise click.UsageError("--curve-secret-key and --curve-server-key go together")
    keys = None
    if curve_secret_key is not None and curve_server_key is not None:
        # Read now, so that a wrong file is said at once rather than at the first request.
        curve.load_secret(curve_secret_key)
        curve.load_public(curve_server_key)
        keys = ServerKeys(curve_secret_key, curve_server_key)
    key = _api_key(api_key, api_key_file)
    listen = _checked_listen(listen, "--listen", key)
    tokenizer = None if model is None else Tokenizer.from_gguf(model)
    click.echo(f"OpenAI API on http://{listen}/v1 for {endpoint}", err=True)
    run(endpoint, listen, api_key=key, tokenizer=tokenizer, curve_keys=keys)
    click.echo("stopped", err=True)


def _api_key(api_key: str | None, api_key_file: Path | None) -> str | None:
    """The API key given, if any (from the file: its text, stripped)."""
    if api_key is not None and api_key_file is not None:
        raise click.UsageError("--api-key and --api-key-file are alternatives")
    if api_key_file is not None:
        api_key = api_key_file.read_text().strip()
        if not api_key:
            raise click.UsageError(f"{api_key_file} holds no key")
    return api_key


def _checked_listen(listen: str, option: str, api_key: str | None) -> str:
    """HOST:PORT for the HTTP API, warning where other machines reach it without a key."""
    from pygemma4.workers.http import listen_address

    try:
        host, _ = listen_address(listen)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint=option) from None
    if api_key is None and not _is_loopback(f"tcp://{host}:0"):
        click.echo(
            f"warning: the HTTP API on {listen} accepts requests from other machines "
            "without a key (--api-key requires one)",
            err=True,
        )
    return listen


class _BenchGroup(click.Group):
    """`bench MODEL ...` is `bench model MODEL ...`: words other than a subcommand's name go
    to the model benchmark."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ctx.help_option_names:
            args = ["model", *args]
        return super().parse_args(ctx, args)


class _IntList(click.ParamType):
    """Comma-separated whole numbers, at least `minimum` each (the option may also repeat)."""

    name = "N[,N...]"

    def __init__(self, minimum: int) -> None:
        self.minimum = minimum

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(int(part) for part in str(value).split(","))
        except ValueError:
            self.fail(f"{value!r} is not a comma-separated list of whole numbers", param, ctx)
        if any(n < self.minimum for n in numbers):
            self.fail(f"{value!r}: each number must be at least {self.minimum}", param, ctx)
        return numbers


def _synthetic_names() -> list[str]:
    from pygemma4.models.synthetic import SYNTHETIC_MODELS

    return list(SYNTHETIC_MODELS)


def _synthetic_path(synthetic: str) -> Path:
    """The cached synthetic model (written first where it is not cached yet)."""
    from rich.console import Console

    from pygemma4.models.synthetic import cache_file_name, synthetic_model_path

    with Console(stderr=True).status(f"writing the synthetic model {cache_file_name(synthetic)}"):
        return synthetic_model_path(synthetic)


@main.group(cls=_BenchGroup)
def bench() -> None:
    """Measure speed: `pygemma4 bench MODEL` (the engine) or `pygemma4 bench serve` (a
    server under load).

    `pygemma4 bench MODEL` is short for `pygemma4 bench model MODEL`.
    """


@bench.command("model", context_settings={"show_default": True})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option(
    "--synthetic",
    type=click.Choice(_synthetic_names()),
    help="Instead of MODEL: a cached GGUF with that model's real shapes and Q4_K_M types, "
    "random weights (written on first use).",
)
@click.option(
    "-p",
    "--n-prompt",
    "prompt_sizes",
    type=_IntList(0),
    multiple=True,
    default=["512"],
    help="Prompt sizes to prefill (0: no prefill test).",
)
@click.option(
    "-n",
    "--n-gen",
    "decode_tokens",
    type=click.IntRange(min=0),
    default=128,
    help="Tokens to decode (0: no decode test).",
)
@click.option(
    "--batch",
    "batches",
    type=_IntList(1),
    multiple=True,
    default=["1"],
    help="Sequences decoded at once (several: a decode test each).",
)
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=5)
@click.option("--warmup", type=click.IntRange(min=0), default=1, help="Unmeasured runs first.")
@_backend_options
@click.option("-t", "--threads", type=click.IntRange(min=1), help="CPU threads [default: all].")
@click.option(
    "--compare",
    type=click.Choice(["llamacpp"]),
    help="Measure llama.cpp too: interleaved where both engines fit in memory, else one after "
    "the other.",
)
@click.option("--seed", type=click.IntRange(min=0), default=0, help="Seed of the token ids fed.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON.")
@_kv_dtype_option
@_draft_options
@_runs_cleanly
def bench_model(
    model: Path | None,
    synthetic: str | None,
    prompt_sizes: tuple[tuple[int, ...], ...],
    decode_tokens: int,
    batches: tuple[tuple[int, ...], ...],
    repetitions: int,
    warmup: int,
    backend: str,
    device: int,
    threads: int | None,
    compare: str | None,
    seed: int,
    json_path: str | None,
    kv_dtype: str | None,
    draft: str | None,
    draft_tokens: int,
) -> None:
    """Prefill and decode tokens/s of MODEL (a Gemma 4 GGUF), load time and peak memory,
    in the manner of llama-bench; with --compare llamacpp beside llama.cpp on the same file,
    threads and token ids.

    With --draft, speculative decoding instead: greedy decode (-n tokens) with and without
    drafting, acceptance per draft position, the cost of verifying 1..k+1 tokens against one
    step, and the speed those costs give at the acceptance published for Google's assistants.
    """
    from rich.console import Console

    from pygemma4.benchmark.model_bench import BenchPlan
    from pygemma4.benchmark.model_bench import bench_model as run
    from pygemma4.benchmark.report import print_model_bench, write_json
    from pygemma4.runner import default_threads

    if draft is not None:
        if compare is not None:
            raise click.UsageError("--draft measures pygemma4 alone: drop --compare")
        _bench_drafting(
            model, synthetic, draft, draft_tokens, decode_tokens, repetitions, backend, device,
            default_threads() if threads is None else threads, seed, json_path,
        )  # fmt: skip
        return

    def flat(lists: tuple[tuple[int, ...], ...]) -> tuple[int, ...]:
        return tuple(dict.fromkeys(n for numbers in lists for n in numbers))

    try:
        plan = BenchPlan(
            prompt_sizes=flat(prompt_sizes),
            decode_tokens=decode_tokens,
            batches=flat(batches),
            repetitions=repetitions,
            warmup=warmup,
            seed=seed,
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    if (model is None) == (synthetic is None):
        raise click.UsageError("name a MODEL or --synthetic NAME (one of the two)")
    path = model if synthetic is None else _synthetic_path(synthetic)
    console = Console()
    engines = ("pygemma4", "llamacpp") if compare else ("pygemma4",)
    with Console(stderr=True).status("starting") as status:
        result = run(
            path,
            plan,
            engines,
            backend=backend,
            device=device,
            threads=default_threads() if threads is None else threads,
            synthetic=synthetic,
            progress=status.update,
            kv_dtype=kv_dtype,
        )
    print_model_bench(result, console)
    if json_path is not None:
        write_json(json_path, result.to_json())


def _bench_drafting(
    model: Path | None,
    synthetic: str | None,
    draft: str,
    draft_tokens: int,
    decode_tokens: int,
    repetitions: int,
    backend: str,
    device: int,
    threads: int,
    seed: int,
    json_path: str | None,
) -> None:
    """`bench MODEL --draft ...`."""
    from rich.console import Console

    from pygemma4.benchmark.draft_bench import bench_drafting
    from pygemma4.benchmark.report import SYNTHETIC_NOTICE, print_draft_bench, write_json

    if (model is None) == (synthetic is None):
        raise click.UsageError("name a MODEL or --synthetic NAME (one of the two)")
    if decode_tokens < 1:
        raise click.UsageError("--draft needs tokens to decode (-n 1 or more)")
    path = model if synthetic is None else _synthetic_path(synthetic)
    with Console(stderr=True).status("starting") as status:
        result = bench_drafting(
            path,
            draft,
            draft_tokens,
            threads=threads,
            generate_tokens=decode_tokens,
            repetitions=repetitions,
            backend=backend,
            device=device,
            seed=seed,
            progress=status.update,
        )
    console = Console()
    print_draft_bench(result, console)
    if synthetic is not None:
        console.print(f"  {SYNTHETIC_NOTICE.format(name=synthetic)}")
    if json_path is not None:
        write_json(json_path, result.to_json())


@bench.command("serve", context_settings={"show_default": True})
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option(
    "--synthetic",
    type=click.Choice(_synthetic_names()),
    help="Instead of MODEL: serve the cached synthetic model of that name.",
)
@click.option("--endpoint", help="Measure the server there instead of starting one.")
@click.option("--requests", default=32, type=click.IntRange(min=1), help="Requests measured.")
@click.option("--concurrency", default=8, type=click.IntRange(min=1), help="Requests in flight.")
@click.option("--prompt-tokens", default=128, type=click.IntRange(min=1))
@click.option(
    "--shared-prefix-tokens",
    default=0,
    type=click.IntRange(min=0),
    help="The first N prompt tokens are the same in every request (prefix reuse).",
)
@click.option("--output-tokens", default=128, type=click.IntRange(min=1))
@click.option(
    "--warmup",
    type=click.IntRange(min=0),
    help="Unmeasured requests first, as many at once [default: --concurrency].",
)
@click.option(
    "--seed", type=click.IntRange(min=0), default=0, help="Seed of the prompts' token ids."
)
@click.option(
    "--timeout", default=600.0, type=click.FloatRange(min=0, min_open=True),
    help="Seconds a request may take.",
)  # fmt: skip
@_backend_options
@click.option("--threads", type=click.IntRange(min=1), help="The server's threads.")
@click.option(
    "--prefill-chunk", type=click.IntRange(min=1), help="The server's prompt tokens per step."
)
@click.option(
    "--max-batch", type=click.IntRange(min=1), help="[default: --concurrency] for the server."
)
@click.option("--n-ctx", type=click.IntRange(min=1), help="The server's context per sequence.")
@click.option("--json", "json_path", type=click.Path(dir_okay=False), help="Also write JSON.")
@click.pass_context
@_runs_cleanly
def bench_serve(
    ctx: click.Context,
    model: Path | None,
    synthetic: str | None,
    endpoint: str | None,
    requests: int,
    concurrency: int,
    prompt_tokens: int,
    shared_prefix_tokens: int,
    output_tokens: int,
    warmup: int | None,
    seed: int,
    timeout: float,
    json_path: str | None,
    **server_options: Any,
) -> None:
    """Load a server with streamed requests: time to first token, inter-token latency
    (p50/p90/p99), output tokens/s, requests/s and errors.

    Starts `pygemma4 serve` on MODEL (the demo model without one, or --synthetic) and stops
    it after, or measures the server already at --endpoint. Each request is a prompt of
    --prompt-tokens random token ids asking for exactly --output-tokens greedy tokens.
    """
    import contextlib

    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TimeElapsedColumn

    from pygemma4.benchmark.load import LoadSpec, run_load
    from pygemma4.benchmark.report import print_load, write_json
    from pygemma4.benchmark.server_process import started_server

    started_options = [
        name
        for name in ("model", "synthetic", *server_options)
        if ctx.get_parameter_source(name) is click.core.ParameterSource.COMMANDLINE
    ]
    if endpoint is not None and started_options:
        names = ", ".join(name.replace("_", "-") for name in started_options)
        raise click.UsageError(f"--endpoint measures a running server: {names} cannot apply")
    if model is not None and synthetic is not None:
        raise click.UsageError("name a MODEL or --synthetic NAME, not both")
    try:
        measured = LoadSpec(
            requests, concurrency, prompt_tokens, output_tokens, seed, timeout, shared_prefix_tokens
        )
    except ValueError as e:
        raise click.UsageError(str(e)) from None
    warmup = concurrency if warmup is None else warmup
    console = Console()
    with contextlib.ExitStack() as stack:
        if endpoint is None:
            path = _synthetic_path(synthetic) if synthetic else _model_path(model and str(model))
            args = _server_args(server_options, concurrency)
            with Console(stderr=True).status(f"starting pygemma4 serve {path.name}"):
                endpoint = stack.enter_context(started_server(path, args=args))
        progress = stack.enter_context(
            Progress(
                "{task.description}",
                BarColumn(),
                MofNCompleteColumn(),
                TimeElapsedColumn(),
                "{task.fields[errors]} errors",
                console=Console(stderr=True),
            )
        )
        if warmup:
            warm = LoadSpec(
                warmup,
                warmup,
                prompt_tokens,
                output_tokens,
                seed + 1,
                timeout,
                shared_prefix_tokens,
            )
            run_load(endpoint, warm, _progress_bar(progress, "warm-up", warmup))
        result = run_load(endpoint, measured, _progress_bar(progress, "requests", requests))
    print_load(result, warmup, console)
    if json_path is not None:
        write_json(json_path, {**result.to_json(records=True), "warmup_requests": warmup})
    if result.completed == 0:
        _fail("every request failed")


def _progress_bar(progress: Progress, name: str, total: int) -> Callable[[RequestRecord], None]:
    """A bar of `total` requests on `progress`, and the callback that advances it as each
    request ends, counting those that failed."""
    task = progress.add_task(name, total=total, errors=0)
    errors = 0

    def request_done(record: RequestRecord) -> None:
        nonlocal errors
        errors += not record.ok
        progress.update(task, advance=1, errors=errors)

    return request_done


def _server_args(options: dict[str, Any], concurrency: int) -> list[str]:
    """`pygemma4 serve` options for the bench's own server: those given, and a batch as
    large as the concurrency unless told otherwise."""
    options = {**options, "max_batch": options["max_batch"] or concurrency}
    args = []
    for name, value in options.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return args


@main.command()
@click.argument("directory", type=click.Path(file_okay=False, path_type=Path))
@click.argument("name")
@_runs_cleanly
def keygen(directory: Path, name: str) -> None:
    """Make a CURVE key pair: DIRECTORY/NAME.key (public) and NAME.key_secret (owner only).

    A server runs with `--curve-secret-key server.key_secret --curve-clients DIR` (DIR holding
    the clients' NAME.key files); a client passes its own NAME.key_secret and the server's
    public file to `Client(..., curve_secret_key=..., curve_server_key=...)`.
    """
    from pygemma4.curve import create_keypair

    public, secret = create_keypair(directory, name)
    click.echo(f"public key: {public}\nsecret key: {secret}")


def _is_loopback(endpoint: str) -> bool:
    host = endpoint.removeprefix("tcp://").rsplit(":", 1)[0].strip("[]")
    return host in ("localhost", "::1") or host.startswith("127.")


def _model_path(model: str | None) -> Path:
    if model is not None:
        return Path(model)
    from pygemma4.models.demo import demo_model_path

    path = demo_model_path()
    click.echo(DEMO_NOTICE.format(path=path), err=True)
    return path


def _logprob_entry(tokenizer: Tokenizer, sampled: SampledToken) -> dict[str, Any]:
    def piece(token_id: int) -> str:
        return tokenizer.token_bytes(token_id).decode("utf-8", "replace")

    return {
        "token_id": sampled.token_id,
        "token": piece(sampled.token_id),
        "logprob": sampled.logprob,
        "top": [
            {"token_id": t, "token": piece(t), "logprob": lp} for t, lp in sampled.top_logprobs
        ],
    }


def _print_logprobs(tokenizer: Tokenizer, chunks: list[GenerationChunk]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("token", "logprob", "top alternatives", title="log-probabilities")
    for chunk in chunks:
        entry = _logprob_entry(tokenizer, chunk.sampled)
        table.add_row(
            repr(entry["token"]),
            f"{entry['logprob']:.3f}",
            "  ".join(f"{t['token']!r} {t['logprob']:.2f}" for t in entry["top"]),
        )
    Console(stderr=True).print(table)
