"""A child process of the local stack leaves no log file behind, wherever a Ctrl-C lands."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, Self

import pytest

from captioner_dev import process as process_module
from captioner_dev.process import LoggedProcess


class Sleeper(LoggedProcess):
    def __init__(self) -> None:
        super().__init__("sleeper-")

    def start(self) -> Self:
        self._spawn([sys.executable, "-c", "import time; time.sleep(30)"])
        return self


@pytest.fixture
def scratch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(process_module.tempfile, "tempdir", str(tmp_path))
    return tmp_path


def test_a_stopped_process_removes_its_log(scratch: Path) -> None:
    with Sleeper() as sleeper:
        assert len(list(scratch.glob("sleeper-*.log"))) == 1
        assert not sleeper.exited()
    assert list(scratch.glob("*")) == []


def test_a_ctrl_c_right_after_the_log_is_created_leaves_no_file(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The interrupt lands after the file exists but before its handle is returned
    (the window that left ff-*.log behind in the demo's Ctrl-C test)."""
    real_open = Path.open

    def open_then_interrupted(self: Path, *args: Any, **kwargs: Any) -> Any:
        real_open(self, *args, **kwargs).close()
        raise KeyboardInterrupt

    monkeypatch.setattr(Path, "open", open_then_interrupted)
    with pytest.raises(KeyboardInterrupt), Sleeper():
        pass
    assert list(scratch.glob("*")) == []


def test_a_ctrl_c_while_the_child_starts_leaves_no_file(
    scratch: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> Any:
        raise KeyboardInterrupt

    monkeypatch.setattr(process_module.subprocess, "Popen", interrupted)
    with pytest.raises(KeyboardInterrupt), Sleeper():
        pass
    assert list(scratch.glob("*")) == []
