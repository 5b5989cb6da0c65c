"""`pygemma4 inspect`'s tables: a model description (see model_info) rendered for a terminal."""

from __future__ import annotations

from itertools import groupby
from typing import Any

from rich.console import Console
from rich.table import Table

LAYER_COLUMNS = ("attention", "heads", "kv heads", "head dim", "rope dims", "rope base", "ffn")


def _console() -> Console:
    console = Console()
    if not console.is_terminal:
        # Piped output has no width to follow; wide enough for the tables not to wrap.
        console = Console(width=120)
    return console


def print_mmproj_report(info: dict[str, Any], tensors: bool = False) -> None:
    """Print a projector file's description (model_info.describe_mmproj) to standard output."""
    console = _console()
    summary = Table.grid(padding=(0, 2))
    for key, value in (
        ("file", info["path"]),
        ("name", str(info["name"])),
        ("architecture", f"{info['architecture']} (multimodal projector)"),
        ("parameters", _count(info["parameters"])),
        ("file size", _size(info["file_bytes"])),
    ):
        summary.add_row(f"[bold]{key}[/bold]", value)
    console.print(summary)
    for tower in ("vision", "audio"):
        shape = Table("", "", title=f"{tower} encoder", show_header=False)
        config = info[tower]
        if config is None:
            shape.add_row("none", "")
        else:
            for key, value in config.items():
                shape.add_row(key, str(value))
        console.print(shape)
    _print_tensors(console, info, tensors)


def _print_tensors(console: Console, info: dict[str, Any], tensors: bool) -> None:
    types = Table("type", "tensors", "parameters", "size", title="tensor types")
    for name, entry in info["tensor_types"].items():
        types.add_row(
            name, str(entry["tensors"]), f"{entry['parameters']:,}", _size(entry["bytes"])
        )
    console.print(types)
    if tensors:
        listing = Table("tensor", "type", "shape", "size", title="tensors")
        for tensor in info["tensors"]:
            shape = " × ".join(str(d) for d in tensor["shape"])
            listing.add_row(tensor["name"], tensor["type"], shape, _size(tensor["bytes"]))
        console.print(listing)


def print_report(info: dict[str, Any], tensors: bool = False, template: bool = False) -> None:
    """Print the description's tables to standard output."""
    console = _console()
    config = info["config"]
    summary = Table.grid(padding=(0, 2))
    rows = [
        ("file", info["path"]),
        ("name", str(info["name"])),
        ("architecture", str(info["architecture"])),
        ("parameters", _count(info["parameters"])),
        ("file size", _size(info["file_bytes"])),
        ("layers", str(config["n_layer"])),
        ("embedding", str(config["n_embd"])),
        ("vocabulary", str(config["vocab_size"])),
        ("training context", str(config["n_ctx_train"])),
        ("sliding window", str(config["sliding_window"])),
        ("per-layer embedding", str(config["n_embd_per_layer"] or "none")),
        (
            "experts",
            f"{config['n_expert_used']} of {config['n_expert']}, ffn {config['n_ff_expert']}"
            if config["n_expert"]
            else "none",
        ),
        ("final logit softcap", str(config["final_logit_softcap"] or "none")),
        ("output", "own matrix" if config["has_output"] else "tied to the embedding"),
    ]
    for key, value in rows:
        summary.add_row(f"[bold]{key}[/bold]", value)
    console.print(summary)

    layers = Table("layers", *LAYER_COLUMNS, "KV", "MoE", title="layers")
    for key, group in groupby(info["layers"], key=_layer_shape):
        indices = [layer["index"] for layer in group]
        span = str(indices[0]) if len(indices) == 1 else f"{indices[0]}-{indices[-1]}"
        layers.add_row(span, *key)
    console.print(layers)

    _print_tensors(console, info, tensors)
    _print_tokenizer(console, info["tokenizer"], template)


def _print_tokenizer(console: Console, tokenizer: dict[str, Any] | None, template: bool) -> None:
    if tokenizer is None:
        console.print("tokenizer: none in this file")
        return
    if "error" in tokenizer:
        console.print(f"tokenizer: unusable ({tokenizer['error']})")
        return
    table = Table.grid(padding=(0, 2))
    table.add_row("[bold]tokenizer[/bold]", str(tokenizer["model"]))
    table.add_row("[bold]tokens[/bold]", str(tokenizer["vocab_size"]))
    table.add_row(
        "[bold]token types[/bold]",
        ", ".join(f"{n} {kind}" for kind, n in tokenizer["token_types"].items()),
    )
    table.add_row("[bold]merges[/bold]", str(tokenizer["merges"]))
    for label, key in (("BOS", "bos"), ("EOS", "eos")):
        table.add_row(f"[bold]{label}[/bold]", _token(tokenizer[key]))
    table.add_row(
        "[bold]stops at[/bold]", ", ".join(_token(t) for t in tokenizer["end_of_generation"])
    )
    table.add_row(
        "[bold]special tokens[/bold]",
        ", ".join(_token(t) for t in tokenizer["special_tokens"]),
    )
    chat = tokenizer["chat_template"]
    lines = chat["text"].splitlines()
    table.add_row(
        "[bold]chat template[/bold]",
        f"{'from the file' if chat['source'] == 'file' else 'built-in Gemma 4'}, "
        f"{len(chat['text'])} characters" + ("" if template else " (--template shows it)"),
    )
    console.print(table)
    if template:
        console.print("\n".join(lines), markup=False, highlight=False)


def _layer_shape(layer: dict[str, Any]) -> tuple[str, ...]:
    return (
        "sliding" if layer["is_sliding"] else "full",
        str(layer["n_head"]),
        str(layer["n_head_kv"]),
        str(layer["head_dim"]),
        str(layer["n_rot"]),
        f"{layer['rope_base']:g}",
        str(layer["n_ff"]),
        ("own" if layer["has_kv"] else f"layer {layer['kv_source']}")
        + ("" if layer["has_v_proj"] else ", V = K"),
        "yes" if layer["is_moe"] else "",
    )


def _token(token: dict[str, Any] | None) -> str:
    return "none" if token is None else f"{token['text']!r} ({token['id']})"


def _count(n: int) -> str:
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "K")):
        if n >= scale:
            return f"{n / scale:.2f} {suffix}"
    return str(n)


def _size(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    scaled = float(n)
    for unit in ("KiB", "MiB", "GiB"):
        scaled /= 1024
        if scaled < 1024 or unit == "GiB":
            break
    return f"{scaled:.2f} {unit}"
