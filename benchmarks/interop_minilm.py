"""Interop check on the real all-MiniLM-L6-v2 (not a timing).

Exports the model, then reads the model directory with Hugging Face AutoTokenizer, fastembed
(a custom model loaded from the folder), sentence-transformers (on the source folder) and
mteb v2 (STS-B dev handed to its own task object, no download), and compares each with
diffcse_runtime.Encoder / the runtime's STS evaluation (what diffcse-eval prints).

Run: python -m benchmarks.interop_minilm [--data DIR] > benchmarks/results/interop_minilm.txt
(demo + dev extras; STS data in ../shared/data/sts by default)
"""

from __future__ import annotations

import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks import benchlib
from diffcse_runtime import Encoder, sts


def export_minilm() -> Path:
    from diffcse_export import ExportOptions, export_model
    from diffcse_runtime import builtin

    out = Path(tempfile.mkdtemp()) / "minilm"
    start = time.perf_counter()
    export_model(builtin.model_path("builtin:all-MiniLM-L6-v2"), out, ExportOptions())
    print(f"export (fp32, no STS gate): {time.perf_counter() - start:.1f} s")
    return out


def check_tokenizer(out: Path, enc: Encoder, texts: list[str]) -> None:
    from transformers import AutoTokenizer

    config = json.loads((out / "tokenizer_config.json").read_text())
    keys = ("tokenizer_class", "model_max_length", "do_lower_case")
    print("tokenizer_config.json:", {k: config.get(k) for k in keys})
    ids = AutoTokenizer.from_pretrained(str(out))(texts, truncation=True)["input_ids"]
    print(
        "AutoTokenizer ids == Encoder ids:",
        ids == [e.ids for e in enc.tokenizer.encode_batch(texts)],
    )


def check_fastembed(out: Path, ours: np.ndarray, texts: list[str]) -> None:
    import fastembed
    from fastembed.common.model_description import ModelSource, PoolingType

    fastembed.TextEmbedding.add_custom_model(
        model="local/minilm", pooling=PoolingType.DISABLED, normalization=False,
        sources=ModelSource(hf="local/minilm"), dim=ours.shape[1], model_file="model.onnx",
        output_name="sentence_embedding",
    )  # fmt: skip
    model = fastembed.TextEmbedding("local/minilm", specific_model_path=str(out))
    theirs = np.stack(list(model.embed(texts)))
    print(
        f"fastembed {fastembed.__version__}: max abs diff to Encoder "
        f"{np.abs(theirs - ours).max():.2e}"
    )


def check_sentence_transformers(ours: np.ndarray, texts: list[str]) -> None:
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    from diffcse_runtime import builtin

    source = str(builtin.model_path("builtin:all-MiniLM-L6-v2"))
    theirs = SentenceTransformer(source, device="cpu").encode(texts)
    cos = np.sum(theirs * ours, 1) / np.linalg.norm(theirs, axis=1) / np.linalg.norm(ours, axis=1)
    print(
        f"sentence-transformers {sentence_transformers.__version__} (source folder) vs "
        f"Encoder: min cosine {cos.min():.7f}"
    )


def check_mteb(enc: Encoder, data: Path) -> None:
    import mteb
    from datasets import Dataset, DatasetDict

    pairs = sts.load_task(data, "STSBenchmark", "dev")
    task = mteb.get_task("STSBenchmark", eval_splits=["validation"])
    columns = {"sentence1": pairs.sents1, "sentence2": pairs.sents2, "score": pairs.gold}
    task.dataset = {"default": DatasetDict(validation=Dataset.from_dict(columns))}
    task.data_loaded = True
    result = mteb.evaluate(
        enc, task, cache=None, overwrite_strategy="always", show_progress_bar=False
    )
    theirs = 100 * result.task_results[0].scores["validation"][0]["cosine_spearman"]
    ours = sts.evaluate(enc, data, ["STSBenchmark"], "dev").scores["STSBenchmark"].spearman
    print(
        f"mteb {mteb.__version__} STS-B dev Spearman x100: {theirs:.4f}; diffcse-eval: "
        f"{ours:.4f}; diff {theirs - ours:+.6f}"
    )


def main() -> None:
    args = benchlib.parser("interop_minilm", __doc__, "data", results=False).parse_args()
    data = benchlib.sts_data_dir(args.data)
    logging.disable(logging.WARNING)
    print("command:", " ".join([Path(sys.executable).name, *sys.argv]))
    print(f"load: {os.getloadavg()[0]:.1f}  machine: {platform.machine()}  cpus: {os.cpu_count()}")
    out = export_minilm()
    enc = Encoder(out)
    texts = sts.load_task(data, "STSBenchmark", "dev").sents1[:200] + ["", "x " * 400]
    ours = enc.encode(texts)
    check_tokenizer(out, enc, texts)
    check_fastembed(out, ours, texts)
    check_sentence_transformers(ours, texts)
    check_mteb(enc, data)
    front = (out / "README.md").read_text().split("---")[1].strip().replace("\n", " | ")
    print("model card front matter:", front)


if __name__ == "__main__":
    benchlib.run_main(main)
