"""diffcse-embed-ray's --runtime and --inference-precision (the options of diffcse-embed).

The engine reaches every actor's Encoder (each part records the one that wrote it), f32 on
OpenVINO gives onnxruntime's vectors, and a rerun may switch engines on a float32 graph but
not on an int8 one, nor precisions (JobSpec says why). Bad choices are refused before Ray
starts, in diffcse-embed's words.
"""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import pyarrow.parquet as pq
import pytest
from click.testing import CliRunner

pytest.importorskip("ray")

from diffcse_runtime import Encoder  # noqa: E402
from diffcse_runtime.cli import embed  # noqa: E402
from diffcse_runtime.ray_embed.cli import main as embed_ray  # noqa: E402
from diffcse_runtime.ray_embed.record import JOB_FILE  # noqa: E402
from tests.ray.test_ray_embed import deadline, local_ray, read_parts, sentences  # noqa: E402, F401


@pytest.mark.slow  # a local Ray and an actor
@pytest.mark.usefixtures("local_ray", "deadline")
def test_runtime_openvino_matches_onnxruntime_and_a_rerun_may_switch_engines(
    tiny_model_dir, tmp_path
):
    pytest.importorskip("openvino")
    texts = sentences(90, seed=3)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(texts) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    base = [str(src), str(out), "-m", str(tiny_model_dir), "--shard-rows", "30", "--actors", "1"]
    res = CliRunner().invoke(embed_ray, [*base, "--runtime", "openvino"])
    assert res.exit_code == 0, res.output
    parts = sorted(out.glob("part-*.parquet"))
    assert len(parts) == 3
    for part in parts:  # the option reached the actor's Encoder
        meta = pq.read_schema(part).metadata
        assert meta[b"diffcse.backend"] == b"openvino", meta
        assert meta[b"diffcse.inference_precision"] == b"f32", meta
    got = np.asarray(read_parts(out).column("embedding").combine_chunks().flatten())
    got = got.reshape(len(texts), -1)
    want = Encoder(tiny_model_dir, backend="onnxruntime").encode(texts)
    cos = (got * want).sum(1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cos.min() >= 0.9999, cos.min()

    # a record written before the option existed, rerun on the other engine: the same job,
    # so only the missing part is embedded, by the engine asked for
    record = json.loads((out / JOB_FILE).read_text())
    del record["spec"]["inference_precision"]
    (out / JOB_FILE).write_text(json.dumps(record))
    parts[1].unlink()
    res = CliRunner().invoke(embed_ray, [*base, "--runtime", "onnxruntime"])
    assert res.exit_code == 0, res.output
    assert "parts written 1, already done 2" in res.output
    engines = [pq.read_schema(p).metadata[b"diffcse.backend"] for p in parts]
    assert engines == [b"openvino", b"onnxruntime", b"openvino"]
    # another precision gives other vectors: another job, refused by name (on any CPU:
    # the refusal comes before an actor would find out whether this one has bf16)
    res = CliRunner().invoke(
        embed_ray, [*base, "--runtime", "openvino", "--inference-precision", "bf16"]
    )
    assert res.exit_code == 1, res.output
    assert f"{out}: holds a different job (changed: inference_precision)" in res.output


@pytest.mark.slow  # a local Ray and an actor
@pytest.mark.usefixtures("local_ray", "deadline")
def test_an_int8_job_keeps_one_engine_and_auto_is_decided_once(tiny_model_dir, tmp_path):
    """An int8 graph's vectors differ between the engines, so its job records the engine
    the command resolved ("auto" included) and a rerun on the other one is refused."""
    pytest.importorskip("openvino")
    from diffcse_runtime.model_dir import load_metadata, write_metadata
    from diffcse_runtime.openvino_backend import resolve_backend

    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    meta = load_metadata(model)
    meta.variant = "int8"  # what export writes for a quantized graph
    write_metadata(model, meta)
    src = tmp_path / "in.txt"
    src.write_text("\n".join(sentences(20, seed=4)) + "\n", encoding="utf-8")
    out = tmp_path / "out"
    base = [str(src), str(out), "-m", str(model), "--actors", "1"]
    res = CliRunner().invoke(embed_ray, base)
    assert res.exit_code == 0, res.output
    engine = resolve_backend("auto", "f32", ["CPUExecutionProvider"])  # this CPU's choice
    assert json.loads((out / JOB_FILE).read_text())["spec"]["engine"] == engine
    other = "onnxruntime" if engine == "openvino" else "openvino"
    res = CliRunner().invoke(embed_ray, [*base, "--runtime", other])
    assert res.exit_code == 1, res.output
    assert f"{out}: holds a different job (changed: engine)" in res.output
    res = CliRunner().invoke(embed_ray, [*base, "--runtime", engine])
    assert res.exit_code == 0 and "parts written 0, already done 1" in res.output, res.output


@pytest.mark.slow  # a local Ray and an actor
@pytest.mark.usefixtures("local_ray", "deadline")
def test_inference_precision_reaches_the_actors(tiny_model_dir, tmp_path):
    """bf16 where the CPU has it; elsewhere the actor's Encoder refuses it in one sentence
    (not an actor death with Ray's traceback)."""
    pytest.importorskip("openvino")
    src = tmp_path / "in.txt"
    src.write_text("two dogs run .\na man plays a guitar .\n", encoding="utf-8")
    out = tmp_path / "out"
    args = [str(src), str(out), "-m", str(tiny_model_dir), "--actors", "1"]
    res = CliRunner().invoke(embed_ray, [*args, "--inference-precision", "bf16"])
    if res.exit_code == 0:
        meta = pq.read_schema(out / "part-000000.parquet").metadata
        assert meta[b"diffcse.inference_precision"] == b"bf16"
    else:
        assert res.exit_code == 1 and "Traceback" not in res.output, res.output
        assert res.output.splitlines()[-1] == (
            "Error: inference_precision 'bf16' is not available on this CPU (OpenVINO runs "
            "f32); it needs AVX512-BF16 or AMX: use 'f32' or 'auto'"
        )


@pytest.mark.parametrize(
    "args, named",
    [
        (["--runtime", "tensorrt"], "--runtime"),
        (["--inference-precision", "fp8"], "--inference-precision"),
        (["--runtime", "onnxruntime", "--inference-precision", "bf16"], "--inference-precision"),
    ],
)
def test_a_bad_runtime_choice_is_a_usage_error(tiny_model_dir, tmp_path, args, named):
    src = tmp_path / "a.txt"
    src.write_text("one\n")
    out = tmp_path / "o"
    res = CliRunner().invoke(embed_ray, [str(src), str(out), "-m", str(tiny_model_dir), *args])
    assert res.exit_code == 2, res.output
    assert named in res.output and "Traceback" not in res.output
    assert not out.exists()


def test_runtime_openvino_without_the_package_is_diffcse_embeds_sentence(
    tiny_model_dir, tmp_path, monkeypatch
):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what a missing package looks like
    src = tmp_path / "a.txt"
    src.write_text("one\n")
    args = ["-m", str(tiny_model_dir), "--runtime", "openvino"]
    plain = CliRunner().invoke(embed, [str(src), "-o", str(tmp_path / "e.npy"), *args])
    res = CliRunner().invoke(embed_ray, [str(src), str(tmp_path / "o"), *args])
    assert (plain.exit_code, res.exit_code) == (1, 1), (plain.output, res.output)
    assert 'needs the openvino package: pip install "diffcse[openvino]"' in res.output
    assert res.output == plain.output  # one sentence, the same one
    assert not (tmp_path / "o").exists()  # refused before Ray started or planned anything
