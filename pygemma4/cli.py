"""The `pygemma4` command line."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import click

from pygemma4.errors import Gemma4Error


def _parse_ids(text: str) -> list[int]:
    try:
        ids = [int(part) for part in text.replace(",", " ").split()]
    except ValueError as exc:
        raise click.BadParameter(f"token ids must be integers separated by commas: {exc}") from exc
    if not ids:
        raise click.BadParameter("give at least one token id")
    return ids


@click.group()
@click.version_option(package_name="pygemma4")
def main() -> None:
    """Gemma 4 GGUF inference with a C++ core."""


@main.command()
@click.argument("model", required=False, type=click.Path(dir_okay=False, path_type=Path))
@click.option(
    "--prompt-ids",
    default="2",
    show_default=True,
    help="Prompt token ids, comma separated (2 is <bos> in Gemma 4 vocabularies).",
)
@click.option("--max-tokens", default=32, show_default=True, type=click.IntRange(min=1))
@click.option("--threads", type=click.IntRange(min=1), help="CPU threads [default: all].")
@click.option("--n-ctx", type=click.IntRange(min=1), help="Context length [default: 4096].")
def run(
    model: Path | None, prompt_ids: str, max_tokens: int, threads: int | None, n_ctx: int | None
) -> None:
    """Greedy-generate from MODEL (a Gemma 4 GGUF), or from the built-in demo model.

    The demo model has random weights: its output is noise, but it exercises the whole engine.
    Point MODEL at a real Gemma 4 GGUF (e.g. a Q4_K_M file of gemma-4-E4B) for real text.
    """
    from pygemma4.demo import demo_model_path
    from pygemma4.engine import Engine

    ids = _parse_ids(prompt_ids)
    try:
        if model is None:
            model = demo_model_path()
            click.echo(f"demo model (random weights, output is noise): {model}")
        start = time.perf_counter()
        engine = Engine(model, threads=threads, n_ctx=n_ctx)
        loaded = time.perf_counter()
        out = engine.generate(ids, max_tokens)
        elapsed = time.perf_counter() - loaded
    except (Gemma4Error, ValueError, OSError) as exc:
        click.echo(f"error: {exc}", err=True)
        sys.exit(1)
    pieces = engine.model_file.gguf.metadata.get("tokenizer.ggml.tokens")
    click.echo(
        f"model: {engine.config.n_layer} layers, n_embd {engine.config.n_embd}, "
        f"vocab {engine.vocab_size}, loaded in {loaded - start:.2f} s, {engine.threads} threads"
    )
    click.echo(f"prompt ids: {ids}")
    click.echo(f"generated ids: {out}")
    if pieces:
        click.echo("generated pieces: " + " ".join(repr(pieces[t]) for t in out))
    click.echo(
        f"{len(ids)} prompt + {len(out)} generated tokens in {elapsed:.3f} s "
        f"({len(out) / elapsed:.1f} tokens/s including the prompt)"
    )
