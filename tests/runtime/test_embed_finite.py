"""diffcse-embed never writes a non-finite vector (issue 23, principles: no silent wrong answer).

A broken model (or a numerically unstable one) can give NaN or infinity. JSON has no such
numbers: `json.dumps` would write `NaN`, which no strict reader accepts, and a .npy full of
NaN poisons every search built on it. The command refuses such a vector before writing it,
in one sentence naming the input line, and publishes nothing.
"""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner

from diffcse_runtime.cli import embed
from diffcse_runtime.encoder import Encoder

BAD = "the line the broken model cannot embed"


@pytest.fixture
def broken_encoder(monkeypatch):
    """The real Encoder, except that the text BAD comes back as NaN (or +inf)."""
    real = Encoder.encode

    def encode(self, texts, *args, **kwargs):
        result = real(self, texts, *args, **kwargs)
        out = result[0] if isinstance(result, tuple) else result
        for i, text in enumerate(texts):
            if text == BAD:
                out[i, 0] = np.nan
            elif text == BAD.upper():
                out[i, -1] = np.inf
        return result

    monkeypatch.setattr(Encoder, "encode", encode)


@pytest.mark.parametrize("suffix", [".jsonl", ".npy"])
@pytest.mark.parametrize("bad", [BAD, BAD.upper()])
def test_a_non_finite_vector_is_refused_naming_its_line(
    tiny_model_dir, tmp_path, broken_encoder, suffix, bad
):
    src = tmp_path / "in.txt"
    src.write_text(f"a fine line\nanother fine line\n{bad}\nlast line\n")
    out = tmp_path / f"out{suffix}"
    res = CliRunner().invoke(embed, [str(src), "-m", str(tiny_model_dir), "-o", str(out)])
    assert res.exit_code == 1, res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith(f"Error: {src}:3: ") and "not finite" in line, res.output
    assert "Traceback" not in res.output
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_stdin_names_stdin_and_line(tiny_model_dir, tmp_path, broken_encoder):
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(
        embed, ["-", "-m", str(tiny_model_dir), "-o", str(out)], input=f"ok\n{BAD}\n"
    )
    assert res.exit_code == 1, res.output
    assert "Error: <stdin>:2: " in res.output and not out.exists()


def test_finite_output_is_strict_json(tiny_model_dir, tmp_path, broken_encoder):
    """The guard lets every finite vector through unchanged (strict JSON parses it back)."""
    import json

    src = tmp_path / "in.txt"
    src.write_text("one\ntwo\n")
    out = tmp_path / "out.jsonl"
    res = CliRunner().invoke(embed, [str(src), "-m", str(tiny_model_dir), "-o", str(out)])
    assert res.exit_code == 0, res.output

    def refuse(token):
        raise AssertionError(f"non-standard JSON number {token}")

    rows = [json.loads(x, parse_constant=refuse) for x in out.read_text().splitlines()]
    assert [r["text"] for r in rows] == ["one", "two"]
    want = Encoder(tiny_model_dir).encode(["one", "two"])
    np.testing.assert_allclose([r["embedding"] for r in rows], want, atol=1e-6)
