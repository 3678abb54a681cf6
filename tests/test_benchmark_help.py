"""Every benchmark script answers ``--help`` (a help string with a bare ``%`` crashes argparse only when printed)."""

from __future__ import annotations

import runpy
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
SCRIPTS = sorted(path.name for path in BENCHMARKS.glob("*.py") if not path.name.startswith("_"))


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_prints_its_help_and_exits_cleanly(script, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [script, "--help"])
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    with pytest.raises(SystemExit) as exited:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    assert exited.value.code in (0, None)
    assert "usage" in capsys.readouterr().out.lower() or script == "quickstart.py"


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_benchmark_script_that_records_its_command_records_its_git_commit_too(script):
    source = (BENCHMARKS / script).read_text()
    if '"command"' in source:
        assert "git_commit" in source, f"{script} writes a result with its command but not the commit it ran at"
