"""One encoding contender in its own process, driven by benchmarks.encode over stdin/stdout.

Each contender runs in a separate process so that thread pools (torch's OpenMP, onnxruntime's
intra-op pool, OpenVINO's streams, the tokenizers' rayon pool) never compete, each can live in
its own venv (sentence-transformers' ONNX and OpenVINO backends need an older transformers),
and the orchestrator can interleave contenders request by request. Protocol: one JSON object
per line.

    start:   python -m benchmarks.encode_worker CONTENDER --model PATH --threads N --device cpu|cuda
             --texts TEXTS.json [--backend onnxruntime|openvino|auto] [--precision f32|bf16]
             (--backend, --precision: ours only; Encoder's backend / inference_precision)
             TEXTS.json maps set names to lists of texts; "calibration" holds the STS-B train
             sentences st-openvino-int8 is calibrated on.
    request: {"op": "time", "set": "short", "batch_size": 32}  -> {"seconds": 0.41}
             {"op": "embed", "set": "dev", "batch_size": 64, "out": "x.npy"} -> {"rows": n}
             {"op": "independence", "set": "indep-short", "neighbours": "indep-long"}
                 -> {"min_cosine": c}: each text of `set` encoded alone vs all of them in one
                 batch, interleaved with the `neighbours` texts
             {"op": "quit"}
    ready:   {"ready": true, "load_seconds": ..., "info": {...}} once the model is loaded
             (info: the engine's settings as it reports them, and the packages' versions).

Every engine is pinned to --threads: torch.set_num_threads, onnxruntime's
intra_op_num_threads, OpenVINO's INFERENCE_NUM_THREADS (onnxruntime and OpenVINO ignore
OMP_NUM_THREADS: an unpinned one takes every core). Exported files (sentence-transformers'
ONNX, int8 ONNX, OpenVINO IR and int8 IR) are made once into the cache copy of the model
folder, before the worker says it is ready: never inside a timed request.

This file imports nothing from diffcse at module level: under the sentence-transformers venv
only sentence_transformers is installed.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONTENDERS = (
    "torch",
    "st-torch",
    "st-onnx",
    "st-onnx-int8",
    "st-openvino",
    "st-openvino-int8",
    "ours",
)
VERSIONED = (
    "diffcse",
    "torch",
    "transformers",
    "sentence-transformers",
    "tokenizers",
    "onnxruntime",
    "openvino",
    "optimum",
    "optimum-onnx",
    "optimum-intel",
    "nncf",
)
OV_INT8_SUFFIX = "qint8_quantized"  # export_static_quantized_openvino_model's default name
CALIBRATION_SAMPLES = 300  # what export_static_quantized_openvino_model calibrates on
CALIBRATION_MAX_LENGTH = 384  # ... padded to this length, as it does


def _limit_threads(n: int) -> None:
    """Pin every pool this process may start to n threads, before any library loads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["RAYON_RS_NUM_CPUS"] = str(n)  # older name still read by tokenizers' rayon
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"


def versions() -> dict[str, str]:
    """The installed versions of the packages that decide a contender's speed (metadata only)."""
    from benchmarks.benchlib import library_versions  # stdlib only: safe in the peers' venv

    return library_versions(VERSIONED)


class TorchCLS:
    """Contender `pytorch`: transformers AutoModel in eager PyTorch, [CLS] pooling.

    Batches are formed the way sentence-transformers does it (sorted by character length,
    longest first), so a ratio to it measures the engine, not the batching.
    """

    def __init__(self, model: Path, threads: int, device: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).eval().to(device)
        self.info = {
            "attn_implementation": getattr(self.model.config, "_attn_implementation", ""),
            "torch_threads": torch.get_num_threads(),
        }

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        order = np.argsort([-len(t) for t in texts], kind="stable")
        out = np.empty((len(texts), self.model.config.hidden_size), np.float32)
        with self.torch.inference_mode():
            for start in range(0, len(texts), batch_size):
                rows = order[start : start + batch_size]
                feats = self.tok(
                    [texts[i] for i in rows],
                    padding=True,
                    truncation=True,
                    max_length=512,
                    return_tensors="pt",
                ).to(self.device)
                hidden = self.model(**feats).last_hidden_state[:, 0]
                out[rows] = hidden.float().cpu().numpy()
        return out


# ------------------------------------------------- sentence-transformers' exported files


def _move_files(pairs: list[tuple[Path, Path]]) -> None:
    """Move exported files into the cache folder, the one the existence check looks for
    (the .xml / .onnx) last: an interrupted export leaves no file that looks complete."""
    for src, dst in pairs:
        dst.parent.mkdir(parents=True, exist_ok=True)
        os.replace(src, dst)


def ensure_st_onnx(model: Path, device: str) -> str:
    """onnx/model.onnx in the cache copy, exported once by sentence-transformers/optimum."""
    from sentence_transformers import SentenceTransformer

    target = model / "onnx" / "model.onnx"
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=model) as tmp:
            exporter = SentenceTransformer(str(model), backend="onnx", device=device)
            exporter.save_pretrained(tmp)
            files = sorted((Path(tmp) / "onnx").iterdir(), key=lambda p: p.name == "model.onnx")
            _move_files([(f, model / "onnx" / f.name) for f in files])
    return "onnx/model.onnx"


def ensure_st_onnx_int8(model: Path, device: str) -> str:
    """sentence-transformers' dynamic int8 (avx2) export: onnx/model_q(u)int8_avx2.onnx."""
    from sentence_transformers import SentenceTransformer, export_dynamic_quantized_onnx_model

    found = sorted((model / "onnx").glob("model_*int8_avx2.onnx"))
    if not found:
        base = SentenceTransformer(str(model), backend="onnx", device=device)
        export_dynamic_quantized_onnx_model(base, "avx2", str(model))
        found = sorted((model / "onnx").glob("model_*int8_avx2.onnx"))
    return f"onnx/{found[0].name}"


def ensure_st_openvino(model: Path, ov_config: dict) -> str:
    """openvino/openvino_model.xml (+ .bin) in the cache copy, exported once by optimum-intel."""
    from sentence_transformers import SentenceTransformer

    target = model / "openvino" / "openvino_model.xml"
    if not target.is_file():
        with tempfile.TemporaryDirectory(dir=model) as tmp:
            kwargs = {"ov_config": ov_config}
            exporter = SentenceTransformer(str(model), backend="openvino", model_kwargs=kwargs)
            exporter.save_pretrained(tmp)
            src = Path(tmp) / "openvino"
            _move_files(
                [
                    (src / f"openvino_model{s}", model / "openvino" / f"openvino_model{s}")
                    for s in (".bin", ".xml")
                ]
            )
    return "openvino/openvino_model.xml"


def calibration_items(tokenizer, input_names, sentences: list[str]) -> list[dict]:
    """One NNCF sample per sentence, tokenized as export_static_quantized_openvino_model does
    (padded to 384 tokens), keeping only the inputs the IR has."""
    items = []
    for text in sentences[:CALIBRATION_SAMPLES]:
        enc = tokenizer(
            text,
            padding="max_length",
            max_length=CALIBRATION_MAX_LENGTH,
            truncation=True,
            return_tensors="np",
        )
        items.append({k: np.asarray(v) for k, v in enc.items() if k in input_names})
    return items


def ensure_st_openvino_int8(model: Path, ov_config: dict, sentences: list[str]) -> str:
    """The OpenVINO IR quantised statically by NNCF on `sentences` (300 STS-B train ones).

    This is export_static_quantized_openvino_model with a different calibration set: that
    function loads GLUE SST-2 from the hub through `datasets`, unreachable here, so the same
    steps (OVQuantizer on the loaded OVModel, default OVQuantizationConfig with 300 samples,
    inputs padded to 384 tokens, the file openvino/openvino_model_qint8_quantized.xml) run
    on an nncf.Dataset built from the given sentences.
    """
    import nncf
    from optimum.intel.openvino import OVConfig, OVQuantizationConfig, OVQuantizer
    from sentence_transformers import SentenceTransformer

    name = f"openvino_model_{OV_INT8_SUFFIX}"
    if (model / "openvino" / f"{name}.xml").is_file():
        return f"openvino/{name}.xml"
    if len(sentences) < CALIBRATION_SAMPLES:
        raise RuntimeError(
            f"st-openvino-int8 calibrates on {CALIBRATION_SAMPLES} sentences, got {len(sentences)}"
        )
    ensure_st_openvino(model, ov_config)
    base = SentenceTransformer(
        str(model), backend="openvino", model_kwargs={"ov_config": ov_config}
    )
    ov_model = base[0].auto_model
    dataset = nncf.Dataset(calibration_items(base.tokenizer, ov_model.input_names, sentences))
    config = OVConfig(quantization_config=OVQuantizationConfig(num_samples=CALIBRATION_SAMPLES))
    with tempfile.TemporaryDirectory(dir=model) as tmp:
        OVQuantizer.from_pretrained(ov_model).quantize(
            calibration_dataset=dataset, save_directory=tmp, ov_config=config
        )
        src = next(p.parent for p in Path(tmp).rglob("openvino_model.xml"))
        _move_files(
            [
                (src / f"openvino_model{s}", model / "openvino" / f"{name}{s}")
                for s in (".bin", ".xml")
            ]
        )
    return f"openvino/{name}.xml"


def _ov_properties(st_model) -> dict:
    """What the compiled OpenVINO model reports (threads, precision), to show the pinning."""
    request = getattr(st_model[0].auto_model, "request", None)
    out = {}
    for key in ("INFERENCE_NUM_THREADS", "INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT"):
        try:
            value = request.get_property(key)
            out[key] = value.get_type_name() if hasattr(value, "get_type_name") else str(value)
        except Exception:  # not compiled yet, or a property this version does not have
            continue
    return out


class SentenceTransformersModel:
    """Contenders st-*: sentence-transformers' own encode() with its native mean pooling and
    normalisation, on the torch, onnx (onnxruntime) or openvino backend."""

    def __init__(
        self, model: Path, threads: int, device: str, contender: str, calibration: list[str]
    ) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        backend = contender.removeprefix("st-").removesuffix("-int8")
        int8 = contender.endswith("-int8")
        self.info: dict = {"backend": backend, "torch_threads": torch.get_num_threads()}
        if backend == "torch":
            self.model = SentenceTransformer(str(model), device=device)
            return
        kwargs = self._onnx_kwargs(model, threads, device, int8) if backend == "onnx" else {}
        if backend == "openvino":
            if device != "cpu":
                raise RuntimeError("the OpenVINO contenders run on the CPU only")
            ov_config = {"INFERENCE_NUM_THREADS": threads}
            kwargs = {"ov_config": ov_config}
            kwargs["file_name"] = (
                ensure_st_openvino_int8(model, ov_config, calibration)
                if int8
                else ensure_st_openvino(model, ov_config)
            )
        self.info["file"] = kwargs["file_name"]
        self.model = SentenceTransformer(
            str(model), backend=backend, device=device, model_kwargs=kwargs
        )
        self.model.encode(["compile before the first timed request"])
        if backend == "openvino":
            self.info["openvino"] = _ov_properties(self.model)
        else:
            session = self.model[0].auto_model.session  # optimum's InferenceSession
            self.info["intra_op_num_threads"] = session.get_session_options().intra_op_num_threads

    @staticmethod
    def _onnx_kwargs(model: Path, threads: int, device: str, int8: bool) -> dict:
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        file_name = ensure_st_onnx(model, device)
        if int8:
            file_name = ensure_st_onnx_int8(model, device)
        return {"provider": provider, "session_options": options, "file_name": file_name}

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


class Ours:
    """Contenders ours-*: diffcse_runtime.Encoder on an exported model directory.

    `backend` is passed only when the contender names one, and only to an Encoder that
    takes it; an Encoder without `backend=` runs onnxruntime, so asking it for
    "onnxruntime" is still answered, anything else is refused with a reason. Providers are
    passed only where they differ from the Encoder's own choice: an explicit list keeps
    backend="auto" on onnxruntime, and ours-auto must get what a user gets.
    """

    def __init__(
        self, model: Path, threads: int, device: str, backend: str | None, precision: str | None
    ) -> None:
        from diffcse_runtime import Encoder
        from diffcse_runtime.encoder import pick_providers

        default = pick_providers()
        providers = default if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda" and providers[0] != "CUDAExecutionProvider":
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        if device == "cuda" and backend == "openvino":
            raise RuntimeError("the OpenVINO contenders run on the CPU only")
        kwargs: dict = {"intra_op_threads": threads}
        if providers != default:  # providers the caller lists make backend="auto" onnxruntime
            kwargs["providers"] = providers
        if backend is not None:
            if "backend" in inspect.signature(Encoder).parameters:
                kwargs["backend"] = backend
            elif backend != "onnxruntime":
                raise RuntimeError(f"this Encoder has no backend= (asked for {backend!r})")
        if precision is not None:
            kwargs["inference_precision"] = precision
        self.encoder = Encoder(model, **kwargs)
        runs = getattr(self.encoder, "backend", "onnxruntime")
        self.info = {
            "variant": self.encoder.meta.variant,
            "backend": runs,
            "provider": providers[0] if runs == "onnxruntime" else None,
            "inference_precision": getattr(self.encoder, "inference_precision", None),
        }

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=batch_size)


def load(args: argparse.Namespace, texts: dict[str, list[str]]):
    if args.contender == "torch":
        return TorchCLS(args.model, args.threads, args.device)
    if args.contender == "ours":
        return Ours(args.model, args.threads, args.device, args.backend, args.precision)
    calibration = texts.get("calibration", [])
    return SentenceTransformersModel(
        args.model, args.threads, args.device, args.contender, calibration
    )


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def min_cosine(a: np.ndarray, b: np.ndarray) -> float:
    cos = (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    return float(cos.min())


def independence(runner, texts: list[str], neighbours: list[str]) -> float:
    """Min cosine between each text encoded alone and the same text in one batch with
    `neighbours` interleaved (longer texts: more padding, other activation ranges)."""
    alone = np.stack([np.asarray(runner.encode([t], 1), np.float32)[0] for t in texts])
    mixed, rows = [], []
    for i, text in enumerate(texts):
        rows.append(len(mixed))
        mixed += [text, *neighbours[i : i + 1]]
    batched = np.asarray(runner.encode(mixed, len(mixed)), np.float32)
    return min_cosine(alone, batched[rows])


def serve(args: argparse.Namespace) -> None:
    texts = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    runner = load(args, texts)
    info = runner.info | {"versions": versions()}
    reply({"ready": True, "load_seconds": time.perf_counter() - t0, "info": info})
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "quit":
            return
        batch = texts[req["set"]]
        if req["op"] == "time":
            _sync(args.device)
            start = time.perf_counter()
            runner.encode(batch, req["batch_size"])
            _sync(args.device)
            reply({"seconds": time.perf_counter() - start})
        elif req["op"] == "embed":
            emb = np.asarray(runner.encode(batch, req["batch_size"]), dtype=np.float32)
            np.save(req["out"], emb)
            reply({"rows": len(emb)})
        elif req["op"] == "independence":
            reply({"min_cosine": independence(runner, batch, texts[req["neighbours"]])})
        else:
            reply({"error": f"unknown op {req['op']!r}"})


def reply(obj: dict) -> None:
    sys.__stdout__.write(json.dumps(obj) + "\n")
    sys.__stdout__.flush()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("contender", choices=CONTENDERS)
    p.add_argument("--model", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--texts", type=Path, required=True)
    p.add_argument("--backend", choices=["onnxruntime", "openvino", "auto"], default=None)
    p.add_argument("--precision", choices=["f32", "bf16", "auto"], default=None)
    args = p.parse_args()
    _limit_threads(args.threads)
    sys.stdout = sys.stderr  # library chatter must not corrupt the protocol channel
    try:
        serve(args)
    except Exception as exc:  # report the reason to the orchestrator, then exit non-zero
        reply({"error": f"{type(exc).__name__}: {exc}"})
        sys.exit(1)


if __name__ == "__main__":
    main()
