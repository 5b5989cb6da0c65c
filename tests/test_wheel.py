"""What the wheel installs, listed by building it without its compiled core (CMake is not
run, so this takes about a second)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
from scikit_build_core.build import build_wheel

REPO_ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def wheel_files(tmp_path_factory: pytest.TempPathFactory) -> list[str]:
    """The paths in a wheel of this checkout built with `wheel.cmake=false`."""
    out = tmp_path_factory.mktemp("wheel")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(REPO_ROOT)  # the build backend reads the project from the working directory
        name = build_wheel(str(out), {"wheel.cmake": "false"})
    with zipfile.ZipFile(out / name) as wheel:
        return wheel.namelist()


def test_the_server_processes_install_as_pygemma4_workers_only(wheel_files: list[str]) -> None:
    top_level = {path.split("/")[0] for path in wheel_files}
    assert {t for t in top_level if not t.endswith(".dist-info")} == {"pygemma4"}
    sources = sorted(f"pygemma4/workers/{p.name}" for p in (REPO_ROOT / "workers").glob("*.py"))
    assert "pygemma4/workers/decode.py" in sources
    assert sorted(p for p in wheel_files if p.startswith("pygemma4/workers/")) == sources


def test_the_wheel_holds_each_file_once(wheel_files: list[str]) -> None:
    assert len(wheel_files) == len(set(wheel_files))


def test_the_chat_page_ships_in_the_package(wheel_files: list[str]) -> None:
    page = sorted(f"pygemma4/web/{p.name}" for p in (REPO_ROOT / "pygemma4" / "web").iterdir())
    assert {"pygemma4/web/index.html", "pygemma4/web/app.js", "pygemma4/web/style.css"} <= set(page)
    assert sorted(p for p in wheel_files if p.startswith("pygemma4/web/")) == page
