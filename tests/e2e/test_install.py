"""``pip install .`` gives a ``captioner`` command that works against the local stack.

The package is built with its real build backend (hatchling, from pyproject.toml)
and installed into a new virtual environment. Nothing is downloaded: the build
runs without isolation, and the new environment sees this environment's
site-packages through a ``.pth`` file, so the dependencies it finds are the ones
requirements.txt pins. That pyproject.toml declares every one of them is checked
by tests/unit/test_packaging.py.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

from captioner_dev.functions import REPO
from tests import images


def run(
    script: Path, env: dict[str, str], *args: str, cwd: Path
) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # never needed
    return subprocess.run(
        [str(script), *args],
        cwd=cwd,
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_installed_command_prints_its_version(installed: Path, tmp_path: Path) -> None:
    from captioner import __version__

    completed = run(installed, {}, "--version", cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert completed.stdout.strip() == f"captioner {__version__}"


def test_installed_command_captions_a_folder_without_pythonpath(
    installed: Path, stack_env: dict[str, str], gemini: Any, tmp_path: Path
) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    shutil.copy(images.PHOTOS / "chelsea.jpg", folder)
    completed = run(installed, stack_env, "describe", str(folder), cwd=tmp_path)
    assert completed.returncode == 0, completed.stderr
    assert "chelsea.jpg\tOffline stand-in caption" in completed.stdout
    assert gemini.calls == 1


def test_installed_package_is_the_product_only(installed: Path) -> None:
    python = installed.parent / "python"
    completed = subprocess.run(
        [str(python), "-c", "import captioner, sys; print(captioner.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=installed.parent,
    )
    assert str(REPO) not in completed.stdout  # imported from the venv, not the clone
    dev = subprocess.run(
        [str(python), "-c", "import captioner_dev"], capture_output=True, cwd=installed.parent
    )
    assert dev.returncode != 0  # the local stack stays in the clone
