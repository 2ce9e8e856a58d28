"""What the CLI tests share: the check that bad input is refused in one line, before anything is written or Ray
starts."""

from __future__ import annotations

import sys

import pytest
from typer.testing import CliRunner

from distml.cli import app


def _refused(args: list[str], out, option: str, text: str) -> str:
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {option}: "), result.stderr
    assert text in lines[0], lines[0]
    assert not out.exists()  # nothing written
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()  # refused before Ray started
    return lines[0]


@pytest.fixture()
def refused():
    """refused(args, out, option, text): `distml ARGS --out OUT` exits 2 with one line `error: OPTION: ...TEXT...`,
    writes nothing and starts no Ray; returns that line."""
    return _refused
