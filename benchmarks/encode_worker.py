"""One encoding contender in its own process, driven by benchmarks.encode over stdin/stdout.

Each contender runs in a separate process so that thread pools (torch's OpenMP, onnxruntime's
intra-op pool, the tokenizers' rayon pool) never compete, each can live in its own venv
(sentence-transformers' ONNX backend needs a different transformers), and the orchestrator
can interleave contenders request by request. Protocol: one JSON object per line.

    start:   python -m benchmarks.encode_worker CONTENDER --model PATH --threads N --device cpu|cuda
             --texts TEXTS.json   ({"short": [...], "long": [...]})
    request: {"op": "time", "set": "short", "batch_size": 32}  -> {"seconds": 0.41}
             {"op": "embed", "set": "dev", "batch_size": 64, "out": "x.npy"} -> {"rows": n}
             {"op": "quit"}
    ready:   {"ready": true, "load_seconds": ..., "info": {...}} once the model is loaded.

This file imports nothing from diffcse at module level: under the sentence-transformers venv
only sentence_transformers is installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

CONTENDERS = ("torch", "st-torch", "st-onnx", "st-onnx-int8", "ours")


def _limit_threads(n: int) -> None:
    """Pin every pool this process may start to n threads, before any library loads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "RAYON_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ["RAYON_RS_NUM_CPUS"] = str(n)  # older name still read by tokenizers' rayon
    os.environ["TOKENIZERS_PARALLELISM"] = "true" if n > 1 else "false"


class TorchCLS:
    """Contender (1): transformers AutoModel in eager PyTorch, [CLS] pooling.

    Batches are formed the way sentence-transformers does it (sorted by character length,
    longest first), so the ratio to this baseline measures the engine, not the batching.
    """

    def __init__(self, model: Path, threads: int, device: str) -> None:
        import torch
        from transformers import AutoModel, AutoTokenizer

        torch.set_num_threads(threads)
        self.torch, self.device = torch, device
        self.tok = AutoTokenizer.from_pretrained(model)
        self.model = AutoModel.from_pretrained(model).eval().to(device)
        self.info = {"attn_implementation": getattr(self.model.config, "_attn_implementation", "")}

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


class SentenceTransformersModel:
    """Contenders st-torch / st-onnx / st-onnx-int8: sentence-transformers' own encode().

    The packaged all-MiniLM-L6-v2 is a sentence-transformers folder (mean pooling +
    normalize): its pooling differs from [CLS], a negligible share of the time. The ONNX
    files are exported once by sentence-transformers/optimum into a cache copy of the
    folder, outside the timed region.
    """

    def __init__(self, model: Path, threads: int, device: str, backend: str, int8: bool) -> None:
        import torch
        from sentence_transformers import SentenceTransformer

        torch.set_num_threads(threads)
        self.info = {"backend": backend}
        if backend == "torch":
            self.model = SentenceTransformer(str(model), device=device)
            return
        import onnxruntime as ort

        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        provider = "CUDAExecutionProvider" if device == "cuda" else "CPUExecutionProvider"
        kwargs = {"provider": provider, "session_options": options}
        onnx_file = Path(model) / "onnx" / "model.onnx"
        if not onnx_file.is_file():  # first use: let sentence-transformers export and save it
            exporter = SentenceTransformer(str(model), backend="onnx", device=device)
            exporter.save_pretrained(str(model))
        if int8:  # sentence-transformers names the file model_q(u)int8_avx2.onnx
            if not list((Path(model) / "onnx").glob("model_*int8_avx2.onnx")):
                from sentence_transformers import export_dynamic_quantized_onnx_model

                base = SentenceTransformer(str(model), backend="onnx", device=device)
                export_dynamic_quantized_onnx_model(base, "avx2", str(model))
            qfile = sorted((Path(model) / "onnx").glob("model_*int8_avx2.onnx"))[0]
            kwargs["file_name"] = f"onnx/{qfile.name}"
        self.info["file"] = kwargs.get("file_name", "onnx/model.onnx")
        self.model = SentenceTransformer(
            str(model), backend="onnx", device=device, model_kwargs=kwargs
        )

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.model.encode(texts, batch_size=batch_size, convert_to_numpy=True)


class Ours:
    """Contenders (3)-(5): diffcse_runtime.Encoder on an exported model directory."""

    def __init__(self, model: Path, threads: int, device: str) -> None:
        from diffcse_runtime import Encoder
        from diffcse_runtime.encoder import pick_providers

        providers = pick_providers() if device == "cuda" else ["CPUExecutionProvider"]
        if device == "cuda" and providers[0] != "CUDAExecutionProvider":
            raise RuntimeError("onnxruntime has no CUDAExecutionProvider (install onnxruntime-gpu)")
        self.encoder = Encoder(model, providers=providers, intra_op_threads=threads)
        self.info = {"variant": self.encoder.meta.variant, "provider": providers[0]}

    def encode(self, texts: list[str], batch_size: int) -> np.ndarray:
        return self.encoder.encode(texts, batch_size=batch_size)


def load(contender: str, model: Path, threads: int, device: str):
    if contender == "torch":
        return TorchCLS(model, threads, device)
    if contender == "ours":
        return Ours(model, threads, device)
    backend = "torch" if contender == "st-torch" else "onnx"
    return SentenceTransformersModel(model, threads, device, backend, contender.endswith("int8"))


def _sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def serve(args: argparse.Namespace) -> None:
    texts = json.loads(Path(args.texts).read_text(encoding="utf-8"))
    t0 = time.perf_counter()
    runner = load(args.contender, args.model, args.threads, args.device)
    reply({"ready": True, "load_seconds": time.perf_counter() - t0, "info": runner.info})
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
