"""Issue 23 defect 9: diffcse.json is hashed, and its values are checked against the graph.

A wrong `embedding_dim` used to give a start-up traceback, a `max_seq_length` beyond the
position table a 500 per long input: now `Encoder(...)` and `diffcse-embed` refuse the
folder with one sentence naming the file and the key.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner

from diffcse_runtime import Encoder, load_metadata, write_metadata
from diffcse_runtime.cli import embed
from diffcse_runtime.errors import ModelDirError
from diffcse_runtime.model_dir import METADATA_FILE
from diffcse_runtime.onnx_facts import read_graph_facts


@pytest.fixture
def model_copy(tiny_model_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(tiny_model_dir, dst)
    return dst


def edit(folder, keep_hash: bool = True, **values):
    """Hand-edit diffcse.json; without `keep_hash`, drop the digest as an old folder has none."""
    path = folder / METADATA_FILE
    raw = json.loads(path.read_text())
    raw.update(values)
    if not keep_hash:
        raw.pop("metadata_sha256", None)
    path.write_text(json.dumps(raw))


def embed_refusal(folder, tmp_path) -> str:
    res = CliRunner().invoke(
        embed, ["-", "-m", str(folder), "-o", str(tmp_path / "o.npy")], input="hi\n"
    )
    assert res.exit_code == 1, res.output
    assert "Traceback" not in res.output
    line = res.output.strip().splitlines()[-1]
    assert line.startswith("Error: ") and len(res.output.strip().splitlines()) == 1, res.output
    return line


def test_the_graph_facts_are_read_without_onnx(tiny_model_dir, tiny_roberta, tmp_path):
    facts = read_graph_facts(tiny_model_dir / "model.onnx")
    assert facts.output_width == 32 and facts.position_rows == 128  # tiny_bert's table
    (tmp_path / "junk.onnx").write_bytes(b"\xff" * 100)
    assert read_graph_facts(tmp_path / "junk.onnx") is None


def test_an_edited_metadata_file_fails_its_hash(model_copy, tmp_path):
    edit(model_copy, normalized=True)  # valid on its own, but not what export wrote
    with pytest.raises(ModelDirError, match=r"diffcse.json: edited after export"):
        Encoder(model_copy)
    assert "diffcse.json: edited after export" in embed_refusal(model_copy, tmp_path)
    meta = load_metadata(model_copy, verify_hash=False)  # the documented re-record
    write_metadata(model_copy, meta)
    assert Encoder(model_copy).meta.normalized is True


def test_embedding_dim_against_the_graph_width(model_copy, tmp_path):
    edit(model_copy, keep_hash=False, embedding_dim=128)
    message = r"diffcse.json: key 'embedding_dim' is 128, but model.onnx outputs 32-wide"
    with pytest.raises(ModelDirError, match=message):
        Encoder(model_copy)
    with pytest.raises(ModelDirError, match=message):
        Encoder(model_copy, verify_hash=False)  # checked whether hashes are verified or not
    assert "key 'embedding_dim' is 128" in embed_refusal(model_copy, tmp_path)


def test_max_seq_length_against_the_position_table(model_copy, tmp_path):
    edit(model_copy, keep_hash=False, max_seq_length=16384)
    message = r"key 'max_seq_length' is 16384, but model.onnx's position table embeds at most 128"
    with pytest.raises(ModelDirError, match=message):
        Encoder(model_copy)
    assert "key 'max_seq_length' is 16384" in embed_refusal(model_copy, tmp_path)
    edit(model_copy, keep_hash=False, max_seq_length=128)  # the whole table is fine
    assert Encoder(model_copy).max_seq_length == 128


def test_a_roberta_table_loses_its_padding_rows(tiny_roberta, tmp_path):
    from tests.support.tiny import export_model_dir

    folder = export_model_dir(tiny_roberta, tmp_path / "rob", max_seq_length=128)
    assert read_graph_facts(folder / "model.onnx").position_rows == 130  # 128 + pad id 1 + 1
    assert Encoder(folder).max_seq_length == 128
    edit(folder, keep_hash=False, max_seq_length=129)
    with pytest.raises(ModelDirError, match="embeds at most 128 tokens"):
        Encoder(folder)


@pytest.mark.parametrize(
    "values, key",
    [
        ({"prompts": {"query": 3}}, "prompts"),
        ({"prompts": {"": "x"}}, "prompts"),
        ({"prompts": ["query: "]}, "prompts"),
        ({"prompts": {"q": "x" * 5000}}, "prompts"),
        ({"default_prompt_name": 1}, "default_prompt_name"),
        ({"prompts": {"query": "q: "}, "default_prompt_name": "passage"}, "default_prompt_name"),
        ({"metadata_sha256": "abc"}, "metadata_sha256"),
    ],
)
def test_prompt_fields_are_validated(model_copy, values, key):
    edit(model_copy, **values)
    with pytest.raises(ModelDirError, match=f"diffcse.json: key '{key}'"):
        load_metadata(model_copy)


def test_a_folder_with_prompts_needs_a_runtime_that_reads_them(model_copy):
    meta = load_metadata(model_copy)
    assert meta.format_version == 1  # folders without prompts stay readable by older runtimes
    meta.prompts = {"query": "query: "}
    write_metadata(model_copy, meta)
    raw = json.loads((model_copy / METADATA_FILE).read_text())
    assert raw["format_version"] == 2 and raw["prompts"] == {"query": "query: "}
    assert load_metadata(model_copy).prompts == {"query": "query: "}


@pytest.mark.slow
@pytest.mark.parametrize("values", [{"embedding_dim": 128}, {"max_seq_length": 16384}])
def test_the_server_refuses_bad_metadata_at_start_up(model_copy, values):
    """Was a start-up traceback (embedding_dim) or a 500 per long input (max_seq_length)."""
    pytest.importorskip("fastapi")
    edit(model_copy, keep_hash=False, **values)
    cmd = [sys.executable, "-m", "diffcse_runtime.serve.cli", "--model", str(model_copy)]
    res = subprocess.run(cmd + ["--port", "0"], capture_output=True, text=True, timeout=120)
    assert res.returncode == 1, res.stderr
    assert "Traceback" not in res.stderr
    key = next(iter(values))
    assert f"diffcse.json: key '{key}' is {values[key]}" in res.stderr.strip().splitlines()[-1]
