"""Fixtures of the end-to-end tests that more than one module uses."""

from __future__ import annotations

import shutil
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Iterator
from pathlib import Path

import pytest

from captioner_dev.functions import REPO


@pytest.fixture(scope="session")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """The ``captioner`` script of a fresh venv with the package installed from a copy."""
    root = tmp_path_factory.mktemp("install")
    source = root / "source"
    # A copy of what a clone holds, so that nothing the build writes lands in the checkout.
    shutil.copytree(
        REPO,
        source,
        ignore=shutil.ignore_patterns(".venv*", ".git", "bench", "terraform", "__pycache__"),
    )
    env_dir = root / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    purelib = Path(
        sysconfig.get_path("purelib", vars={"base": str(env_dir), "platbase": str(env_dir)})
    )
    (purelib / "outer.pth").write_text(sysconfig.get_path("purelib") + "\n")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "--python",
            str(env_dir / "bin" / "python"),
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            str(source),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    return env_dir / "bin" / "captioner"
