"""pyproject.toml (what `pip install .` brings) and requirements.txt (what the deployed
function installs, pinned) describe the same product."""

from __future__ import annotations

import ast
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

REPO = Path(__file__).resolve().parents[2]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
# Import name → distribution, for the third-party packages src/captioner imports.
DISTRIBUTIONS = {
    "aiohttp": "aiohttp",
    "google.auth": "google-auth",
    # Only adapters/vertex_batch.py (batch jobs: resumable uploads, streamed reads).
    "google.cloud": "google-cloud-storage",
    "google.genai": "google-genai",
    # Only adapters/storage.py (checksums of downloads).
    "google_crc32c": "google-crc32c",
    "PIL": "pillow",
    "pillow_heif": "pillow-heif",
    "pydantic": "pydantic",
    "stamina": "stamina",
    "tqdm": "tqdm",
    # Only http_api.py, which runs inside functions-framework, never in the CLI.
    "starlette": None,
}


def pinned() -> dict[str, Requirement]:
    lines = (REPO / "requirements.txt").read_text().splitlines()
    reqs = [Requirement(line) for line in lines if line.strip() and not line.startswith("#")]
    return {canonicalize_name(r.name): r for r in reqs}


def declared() -> dict[str, Requirement]:
    reqs = [Requirement(text) for text in PYPROJECT["project"]["dependencies"]]
    return {canonicalize_name(r.name): r for r in reqs}


def third_party_imports() -> set[str]:
    found: set[str] = set()
    for path in (REPO / "src" / "captioner").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module or ""]
                if isinstance(node, ast.ImportFrom) and node.level == 0
                else []
            )
            for name in names:
                for prefix in DISTRIBUTIONS:
                    if name == prefix or name.startswith(prefix + "."):
                        found.add(prefix)
                if name == "google":  # `from google import genai`
                    found.add("google.genai")
    return found


def test_every_third_party_import_of_the_package_is_a_declared_dependency() -> None:
    imports = third_party_imports()
    assert "google.genai" in imports
    assert "PIL" in imports
    for module in imports:
        distribution = DISTRIBUTIONS[module]
        if distribution is not None:
            assert canonicalize_name(distribution) in declared(), module


def test_declared_ranges_admit_the_pinned_versions_the_function_runs() -> None:
    pins = pinned()
    for name, requirement in declared().items():
        assert name in pins, f"{name} is declared but not pinned in requirements.txt"
        (pin,) = pins[name].specifier
        assert requirement.specifier.contains(pin.version), (name, pin.version)
        assert requirement.extras <= pins[name].extras | {"requests"}, name


def test_console_script_and_version_come_from_the_package() -> None:
    assert PYPROJECT["project"]["scripts"] == {"captioner": "captioner.edges.cli:main"}
    assert PYPROJECT["tool"]["hatch"]["version"]["path"] == "src/captioner/__init__.py"
