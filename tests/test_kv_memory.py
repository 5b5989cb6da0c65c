"""The KV pool sized by memory: budgets as sizes or fractions, the layout that fits a budget,
and a server whose context defaults to the model's where its pool holds it."""

from __future__ import annotations

from pathlib import Path

import pytest
from serve_helpers import ServeProcess, run_serve

from pygemma4 import open_model
from pygemma4.kv import KvExhaustedError, KvLayout
from pygemma4.memory import MemoryBudget, MemoryBudgetError


@pytest.mark.parametrize(
    ("text", "size", "fraction"),
    [("8GiB", 8 << 30, None), ("512MB", 512 * 10**6, None), ("1024", 1024, None),
     ("0.5", None, 0.5), ("1.0", None, 1.0), (" 2 kib ", 2048, None)],
)  # fmt: skip
def test_budgets_are_sizes_or_fractions(text, size, fraction):
    budget = MemoryBudget.parse(text)
    assert (budget.size, budget.fraction) == (size, fraction)
    assert budget.resolve(10_000) == (size if size is not None else int(10_000 * fraction))


@pytest.mark.parametrize("text", ["", "lots", "8 GiBs", "1.5", "0.0", "-1", "0"])
def test_bad_budgets_are_refused_naming_them(text):
    with pytest.raises(MemoryBudgetError):
        MemoryBudget.parse(text)
    with pytest.raises(MemoryBudgetError, match="unknown"):
        MemoryBudget.parse("0.5").resolve(None)


def test_the_layout_for_a_budget_fits_it_and_uses_it(fixtures_dir):
    config = open_model(fixtures_dir / "gemma4-tiny-e" / "model-Q8_0.gguf").config
    for budget in (2 << 20, 8 << 20, 64 << 20):
        layout = KvLayout.for_memory(config, budget, 4, 64, 10**6)
        assert layout.nbytes <= budget
        bigger = KvLayout.of(config, 16, layout.n_blocks + 1, 4, layout.ring_blocks)
        assert bigger.nbytes > budget
    capped = KvLayout.for_memory(config, 64 << 20, 4, 64, 1000)
    assert capped.n_blocks == 63  # 1000 positions in blocks of 16
    with pytest.raises(KvExhaustedError, match="holds no block"):
        KvLayout.for_memory(config, 1000, 4, 64, 10**6)


def test_serve_sizes_its_pool_by_memory(demo_model_file: Path, tmp_path: Path):
    with (
        ServeProcess.running(
            demo_model_file, tmp_path, "--threads", "1", "--kv-memory", "16MiB"
        ) as server,
        server.client() as client,
    ):
        info = client.info()
        assert info.n_ctx == open_model(demo_model_file).config.n_ctx_train
        assert "KV pool: " in server.output()
        total = client.health().kv_blocks_total
        assert 0 < total * 16 <= 16 * 2**20  # positions, each at least a byte
    result = run_serve(demo_model_file, "--kv-memory", "lots", cwd=tmp_path)
    assert result.returncode == 1 and "'lots' is not a memory size" in result.stderr
    result = run_serve(demo_model_file, "--kv-tokens", "64", "--n-ctx", "4096", cwd=tmp_path)
    assert result.returncode == 1 and "the pool holds 64" in result.stderr
