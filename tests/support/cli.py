"""Running a click command in-process, and the shape every refusal must have."""

from __future__ import annotations

from click.testing import CliRunner, Result


def run(cmd, args, input=None) -> Result:
    """Invoke `cmd` with `args` (paths welcome); exceptions propagate, as a bug would."""
    return CliRunner().invoke(cmd, [str(a) for a in args], input=input, catch_exceptions=False)


def refused(res: Result, *phrases: str) -> str:
    """Exit 1 with one 'Error: ...' line holding every phrase, and no traceback."""
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error: "), res.output
    for phrase in phrases:
        assert phrase in line, line
    return line
