"""diffcse-export records sentence-transformers prompts in diffcse.json: the source's own
(config_sentence_transformers.json) and `--prompt NAME=TEXT`; the runtime then uses them."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner

from tests.support import tiny

pytest.importorskip("torch")

from diffcse_export.cli import main  # noqa: E402
from diffcse_runtime import Encoder, load_metadata  # noqa: E402
from diffcse_runtime.conventions import ST_SETTINGS_FILE  # noqa: E402

TEXTS = tiny.corpus(6, seed=4)


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def refused(result, *phrases: str) -> None:
    assert result.exit_code == 1, result.output
    line = result.output.strip().splitlines()[-1]
    assert line.startswith("Error: ") and "Traceback" not in result.output
    for phrase in phrases:
        assert phrase in line, line


def test_prompt_flags_reach_the_runtime(tiny_bert, tmp_path):
    out = tmp_path / "m"
    res = run(
        tiny_bert, out, "--max-seq-length", "64", "--sts-data", tmp_path / "none", "-q",
        "--prompt", "query=query: ", "--prompt", "document=passage: ",
        "--default-prompt-name", "query",
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    meta = load_metadata(out)
    assert meta.prompts == {"query": "query: ", "document": "passage: "}
    assert meta.default_prompt_name == "query" and meta.format_version == 2
    enc = Encoder(out)
    plain = enc.encode(TEXTS, prompt="")
    np.testing.assert_array_equal(enc.encode(TEXTS), enc.encode_query(TEXTS))
    np.testing.assert_array_equal(enc.encode_query(TEXTS), enc.encode(TEXTS, prompt="query: "))
    assert np.abs(enc.encode_document(TEXTS) - plain).max() > 1e-3


def test_a_sentence_transformers_sources_prompts_travel(tiny_bert, tmp_path):
    source = tiny.as_sentence_transformers(tiny_bert, tmp_path / "st", "mean", max_seq_length=64)
    settings = {"prompts": {"query": "q: ", "document": "", "title": "t: "}}
    (source / ST_SETTINGS_FILE).write_text(json.dumps(settings))
    out = tmp_path / "m"
    res = run(source, out, "--sts-data", tmp_path / "none", "-q", "--prompt", "title=T: ")
    assert res.exit_code == 0, res.output
    assert load_metadata(out).prompts == {"query": "q: ", "title": "T: "}  # flag wins


@pytest.mark.parametrize(
    "args, phrases",
    [
        (["--prompt", "query"], ["--prompt 'query': expected NAME=TEXT"]),
        (["--prompt", "=x"], ["expected NAME=TEXT"]),
        (["--prompt", "q=a", "--prompt", "q=b"], ["--prompt 'q' is given twice"]),
        (["--prompt", "q=a", "--default-prompt-name", "d"], ["default prompt name 'd'"]),
        (["--prompt", "q=" + "x" * 5000], ["prompts must map"]),
    ],
)
def test_bad_prompt_flags_are_refused_before_work(tiny_bert, tmp_path, args, phrases):
    out = tmp_path / "m"
    refused(run(tiny_bert, out, "--sts-data", tmp_path / "none", *args), *phrases)
    assert not out.exists()


def test_a_pooling_that_leaves_prompts_out_is_refused(tiny_bert, tmp_path):
    source = tiny.as_sentence_transformers(tiny_bert, tmp_path / "st", "mean", max_seq_length=64)
    config = source / "1_Pooling" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "include_prompt": False}))
    out = tmp_path / "m"
    res = run(source, out, "--sts-data", tmp_path / "none", "--prompt", "query=q: ")
    refused(res, "include_prompt: false")
    assert run(source, out, "--sts-data", tmp_path / "none", "-q").exit_code == 0  # no prompts
