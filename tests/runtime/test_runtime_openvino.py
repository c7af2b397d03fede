"""The OpenVINO backend: parity with onnxruntime, batch independence, the auto choice,
threads, errors, and the CLI option (extra `diffcse[openvino]`, part of `dev`)."""

from __future__ import annotations

import logging
import pickle
import shutil
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from diffcse_runtime import Encoder
from diffcse_runtime import openvino_backend as ovb
from diffcse_runtime.cli import embed
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.model_dir import load_metadata, write_metadata
from tests.support import tiny
from tests.support.cli import run

pytest.importorskip("openvino", reason="the openvino extra is not installed")

TEXTS = tiny.corpus(64)


def _bf16_cpu() -> bool:
    import openvino as ov

    return "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")


NEEDS_BF16 = pytest.mark.skipif(not _bf16_cpu(), reason="this CPU has no AVX512-BF16 or AMX")
PRECISIONS = ["f32", pytest.param("bf16", marks=NEEDS_BF16)]


def _cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


@pytest.fixture(scope="module")
def ort_rows(tiny_model_dir) -> np.ndarray:
    return Encoder(tiny_model_dir, backend="onnxruntime").encode(TEXTS)


@pytest.mark.parametrize("precision", PRECISIONS)
def test_openvino_matches_onnxruntime(tiny_model_dir, ort_rows, precision):
    enc = Encoder(tiny_model_dir, backend="openvino", inference_precision=precision)
    assert (enc.backend, enc.inference_precision) == ("openvino", precision)
    rows = enc.encode(TEXTS)
    assert rows.dtype == np.float32 and rows.shape == ort_rows.shape
    floor = 0.99999 if precision == "f32" else 0.999  # bf16: the fp16 variant's bar
    assert _cosines(rows, ort_rows).min() >= floor
    if precision == "f32":
        np.testing.assert_allclose(rows, ort_rows, atol=1e-5)


@pytest.mark.parametrize(
    "backend,precision",
    [
        ("onnxruntime", "f32"),
        ("openvino", "f32"),
        pytest.param("openvino", "bf16", marks=NEEDS_BF16),
    ],
)
def test_a_text_gets_the_same_vector_alone_or_in_a_batch(tiny_model_dir, backend, precision):
    enc = Encoder(tiny_model_dir, backend=backend, inference_precision=precision)
    together = enc.encode(TEXTS, batch_size=64)
    alone = np.stack([enc.encode([text])[0] for text in TEXTS])
    assert _cosines(alone, together).min() >= 0.9999


def test_concurrent_runs_from_threads_match_serial(tiny_model_dir):
    """The server runs batches from several threads on one Encoder: each thread has its
    own infer request, so rows never mix."""
    enc = Encoder(tiny_model_dir, backend="openvino", intra_op_threads=1, streams=2)
    serial = [enc.encode(TEXTS[i::4]) for i in range(4)]
    with ThreadPoolExecutor(4) as pool:
        parallel = list(pool.map(lambda i: enc.encode(TEXTS[i::4]), range(4)))
    for a, b in zip(serial, parallel, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("threads,streams", [(1, 1), (2, 1), (1, 2)])
def test_threads_and_streams_are_pinned_in_the_compiled_model(tiny_model_dir, threads, streams):
    enc = Encoder(tiny_model_dir, backend="openvino", intra_op_threads=threads, streams=streams)
    props = enc.session.properties()
    assert props["INFERENCE_NUM_THREADS"] == str(threads * streams)
    assert props["NUM_STREAMS"] == str(streams)
    assert props["PERFORMANCE_HINT"] == "LATENCY"
    assert enc.session.compiled.get_property("ENABLE_CPU_PINNING") is False


@pytest.mark.parametrize(
    "flags,expected",
    [
        ({"avx2", "avx512f", "avx512_vnni", "avx512_bf16"}, "openvino"),
        ({"avx2", "avx_vnni"}, "openvino"),
        ({"avx2", "avx512f", "amx_int8", "amx_bf16"}, "openvino"),
        ({"avx2", "fma"}, "onnxruntime"),  # where OpenVINO measured 0.3-0.8x onnxruntime
        (set(), "onnxruntime"),
    ],
)
def test_auto_takes_openvino_on_cpus_it_pays_on_and_onnxruntime_for_explicit_providers(
    tiny_model_dir, monkeypatch, flags, expected
):
    monkeypatch.setattr(ovb, "cpu_flags", lambda: frozenset(flags))
    assert Encoder(tiny_model_dir).backend == expected
    explicit = Encoder(tiny_model_dir, providers=["CPUExecutionProvider"])
    assert explicit.backend == "onnxruntime" and explicit.inference_precision is None
    if expected == "onnxruntime" and _bf16_cpu():  # bf16 asked for outright: OpenVINO
        assert Encoder(tiny_model_dir, inference_precision="bf16").backend == "openvino"
    elif expected == "onnxruntime":  # ... which refuses it on a CPU without bf16
        with pytest.raises(DiffcseError, match="not available on this CPU"):
            Encoder(tiny_model_dir, inference_precision="bf16")
    monkeypatch.setattr(ovb, "AUTO_PREFERS_OPENVINO", False)
    assert Encoder(tiny_model_dir).backend == "onnxruntime"


def test_cpu_flags_are_this_machines():
    flags = ovb.cpu_flags()
    with open("/proc/cpuinfo") as fh:
        line = next(line for line in fh if line.startswith("flags"))
    assert flags == frozenset(line.split(":", 1)[1].split()) and "sse2" in flags


def test_auto_without_openvino_is_onnxruntime_and_openvino_asked_names_the_extra(
    tiny_model_dir, monkeypatch
):
    monkeypatch.setitem(sys.modules, "openvino", None)  # what a missing package looks like
    assert not ovb.openvino_available()
    assert Encoder(tiny_model_dir).backend == "onnxruntime"
    with pytest.raises(DiffcseError, match=r'pip install "diffcse\[openvino\]"'):
        Encoder(tiny_model_dir, backend="openvino")
    with pytest.raises(DiffcseError, match=r'pip install "diffcse\[openvino\]"'):
        Encoder(tiny_model_dir, inference_precision="bf16")


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"backend": "tensorrt"}, "backend must be one of auto, onnxruntime, openvino"),
        ({"inference_precision": "fp8"}, "inference_precision must be one of auto, f32, bf16"),
        ({"backend": "onnxruntime", "inference_precision": "bf16"}, "needs backend 'openvino'"),
        ({"streams": 0}, "streams must be an int >= 1"),
    ],
)
def test_bad_choices_are_refused_in_one_sentence(tiny_model_dir, kwargs, message):
    with pytest.raises(ValueError, match=message):
        Encoder(tiny_model_dir, **kwargs)


def test_pickled_encoder_keeps_its_backend_and_precision(tiny_model_dir):
    enc = Encoder(tiny_model_dir, backend="openvino", inference_precision="f32", intra_op_threads=1)
    copy = pickle.loads(pickle.dumps(enc))
    assert (copy.backend, copy.inference_precision) == ("openvino", "f32")
    np.testing.assert_array_equal(copy.encode(TEXTS[:5]), enc.encode(TEXTS[:5]))


def test_embed_cli_runs_on_the_chosen_runtime(tiny_model_dir, ort_rows, tmp_path):
    src = tmp_path / "in.txt"
    src.write_text("\n".join(TEXTS[:8]) + "\n", encoding="utf-8")
    for runtime in ("openvino", "onnxruntime"):
        out = tmp_path / f"{runtime}.npy"
        args = [str(src), "-m", str(tiny_model_dir), "-o", str(out), "--runtime", runtime]
        args += ["--inference-precision", "f32"] if runtime == "openvino" else []
        result = run(embed, args)
        assert result.exit_code == 0, result.output
        np.testing.assert_allclose(np.load(out), ort_rows[:8], atol=1e-5)


def test_a_precision_the_export_gate_failed_is_warned_about(tiny_model_dir, tmp_path, caplog):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    meta = load_metadata(folder)
    assert meta.validation["openvino"]["f32"]["passed"] is True  # export measured it
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        Encoder(folder, backend="openvino", inference_precision="f32")
    assert not [r for r in caplog.records if "parity limits" in r.getMessage()]
    meta.validation["openvino"]["f32"].update(passed=False, failures=["min cosine 0.9 < 0.99"])
    write_metadata(folder, meta)
    with caplog.at_level(logging.WARNING, logger="diffcse_runtime"):
        Encoder(folder, backend="openvino", inference_precision="f32")
    (message,) = [r.getMessage() for r in caplog.records if "parity limits" in r.getMessage()]
    assert "OpenVINO f32 missed" in message and "min cosine 0.9 < 0.99" in message


def test_auto_precision_is_bf16_only_where_the_cpu_has_it_and_the_gate_passed_it(
    tiny_model_dir, tmp_path
):
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    meta = load_metadata(folder)
    gate = meta.validation["openvino"]["bf16"]
    if _bf16_cpu():
        assert gate["passed"] is True  # export measured it
    else:  # export could not measure it here, and says so
        assert gate == {"skipped": "this CPU has no AVX512-BF16 or AMX", "passed": None}
    expected = "bf16" if _bf16_cpu() else "f32"
    assert Encoder(folder, backend="openvino").inference_precision == "f32"  # the default

    def auto(path):
        return Encoder(path, backend="openvino", inference_precision="auto")

    assert auto(folder).inference_precision == expected
    gate.update(passed=True, failures=[])  # a gate passed elsewhere: the CPU still decides
    write_metadata(folder, meta)
    assert auto(folder).inference_precision == expected
    gate.update(passed=False, failures=["min cosine 0.9 < 0.999"])
    write_metadata(folder, meta)
    assert auto(folder).inference_precision == "f32"
    del meta.validation["openvino"]  # exported without openvino: bf16 was never gated
    write_metadata(folder, meta)
    assert auto(folder).inference_precision == "f32"


def test_ray_text_embedder_passes_the_runtime_choice_through(tiny_model_dir, ort_rows):
    pa = pytest.importorskip("pyarrow")
    from diffcse_runtime.ray_embed.batch import TextEmbedder

    for backend in ("openvino", "onnxruntime"):
        embedder = TextEmbedder(tiny_model_dir, backend=backend)
        assert embedder.encoder.backend == backend
        out = embedder(pa.table({"text": TEXTS[:4]}))
        rows = np.asarray(out.column("embedding").to_pylist(), dtype=np.float32)
        np.testing.assert_allclose(rows, ort_rows[:4], atol=1e-5)


@pytest.mark.parametrize("order", ["runtime first", "precision first"])
def test_every_command_refuses_onnxruntime_with_bf16_as_a_usage_error(
    tiny_model_dir, tmp_path, order
):
    """The one pair the choices let through: one sentence naming the option that completed
    it, exit 2, whichever comes first on the command line; no traceback, nothing written."""
    from diffcse_runtime.cli import evaluate_cmd, search
    from diffcse_runtime.serve.cli import serve

    src = tmp_path / "in.txt"
    src.write_text("a\n", encoding="utf-8")
    pair = [["--runtime", "onnxruntime"], ["--inference-precision", "bf16"]]
    pair = [*pair[0], *pair[1]] if order == "runtime first" else [*pair[1], *pair[0]]
    model = ["-m", str(tiny_model_dir)]
    commands = {
        "embed": (embed, [str(src), *model, "-o", str(tmp_path / "o.npy")]),
        "eval": (evaluate_cmd, [*model, "--data", str(tmp_path)]),
        "search": (search, [*model, "--index", str(tmp_path / "idx"), "--build", str(src)]),
        "serve": (serve, [*model, "--port", "0"]),
    }
    named = "--inference-precision" if order == "runtime first" else "--runtime"
    for name, (command, args) in commands.items():
        result = run(command, [*args, *pair])
        assert result.exit_code == 2, (name, result.output)
        assert f"Invalid value for '{named}'" in result.output, (name, result.output)
        assert "onnxruntime's CPU kernels run float32" in result.output, name
        assert "Traceback" not in result.output, name
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in.txt"]
