"""The command line with images and audio: `generate --mmproj --image/--audio` gives the
engine's tokens for the same chat, `inspect` describes a projector file (both towers), and bad
uses fail with one clear line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_cli import run_cli

from pygemma4 import Engine


def test_generate_with_images_gives_the_engines_tokens(mm_dir: Path, tmp_path: Path) -> None:
    images = [mm_dir / "inputs" / "img0.png", mm_dir / "inputs" / "img1.png"]
    result = run_cli(
        "generate",
        str(mm_dir / "model-f32.gguf"),
        "--mmproj",
        str(mm_dir / "mmproj-f32.gguf"),
        *(arg for image in images for arg in ("--image", str(image))),
        "--max-image-tokens",
        "70",
        "What is this?",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--threads",
        "1",
        cache=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    engine = Engine(
        mm_dir / "model-f32.gguf", threads=1, mmproj=mm_dir / "mmproj-f32.gguf", max_image_tokens=70
    )
    content = [{"type": "image", "image": str(p)} for p in images]
    prompt = engine.prepare(
        [{"role": "user", "content": [*content, {"type": "text", "text": "What is this?"}]}]
    )
    assert out["prompt_tokens"] == len(prompt) == 2 + 63 + 2 + 55 + 18
    assert out["token_ids"] == engine.generate(prompt, 6, stop_tokens=())


def test_inspect_describes_a_projector(mm_dir: Path, tmp_path: Path) -> None:
    result = run_cli("inspect", str(mm_dir / "mmproj-f32.gguf"), "--json", cache=tmp_path)
    assert result.returncode == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["architecture"] == "clip"
    assert info["vision"]["n_embd"] == 64 and info["vision"]["projection_dim"] == 128
    assert info["audio"]["n_mel"] == 128
    assert info["audio"]["n_layer"] == 2 and info["audio"]["projection_dim"] == 128
    text = run_cli("inspect", str(mm_dir / "mmproj-f32.gguf"), cache=tmp_path)
    assert text.returncode == 0 and "vision encoder" in text.stdout
    assert "audio encoder" in text.stdout


@pytest.mark.parametrize("with_image", [False, True])
def test_generate_with_audio_gives_the_engines_tokens(
    mm_dir: Path, tmp_path: Path, with_image: bool
) -> None:
    clip = mm_dir / "inputs" / "aud0.wav"
    image = mm_dir / "inputs" / "img1.png"
    result = run_cli(
        "generate",
        str(mm_dir / "model-f32.gguf"),
        "--mmproj",
        str(mm_dir / "mmproj-f32.gguf"),
        *(("--image", str(image)) if with_image else ()),
        "--audio",
        str(clip),
        "--max-image-tokens",
        "70",
        "What do you hear?",
        "--max-tokens",
        "6",
        "--ignore-eos",
        "--json",
        "--threads",
        "1",
        cache=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    engine = Engine(
        mm_dir / "model-f32.gguf", threads=1, mmproj=mm_dir / "mmproj-f32.gguf", max_image_tokens=70
    )
    content = [{"type": "image", "image": str(image)}] if with_image else []
    content += [
        {"type": "audio", "audio": str(clip)},
        {"type": "text", "text": "What do you hear?"},
    ]
    prompt = engine.prepare([{"role": "user", "content": content}])
    assert [m.length for m in prompt.media] == ([55, 25] if with_image else [25])
    assert out["prompt_tokens"] == len(prompt)
    assert out["token_ids"] == engine.generate(prompt, 6, stop_tokens=())


@pytest.mark.parametrize(
    ("extra", "words"),
    [
        (("--image", "x.png"), "--image needs --mmproj"),
        (("--mmproj", "MMPROJ", "--image", "absent.png"), "absent.png: no such file"),
        (("--mmproj", "MODEL", "--image", "IMG"), "not 'clip'"),
        (("--audio", "x.wav"), "--audio needs --mmproj"),
        (("--mmproj", "MMPROJ", "--audio", "absent.wav"), "absent.wav: cannot read the file"),
        (("--mmproj", "MMPROJ", "--audio", "IMG"), "not a WAV file"),
    ],
)
def test_bad_uses_fail_with_one_line(mm_dir: Path, tmp_path: Path, extra, words) -> None:
    names = {
        "MMPROJ": str(mm_dir / "mmproj-f32.gguf"),
        "MODEL": str(mm_dir / "model-f32.gguf"),
        "IMG": str(mm_dir / "inputs" / "img0.png"),
    }
    args = [names.get(a, a) for a in extra]
    result = run_cli(
        "generate", str(mm_dir / "model-f32.gguf"), *args, "Hi", "--threads", "1", cache=tmp_path
    )
    assert result.returncode != 0
    assert words in result.stderr
    assert "Traceback" not in result.stderr
