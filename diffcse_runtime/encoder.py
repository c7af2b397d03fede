"""Encoder: sentence embeddings from a model directory with onnxruntime, no torch.

The pipeline is tokenize (one Rust batch call) -> sort by token length -> pad each batch
only to its own longest row -> session.run -> put rows back in input order. Sorting by
length is what makes batching cheap: a batch of short sentences never pays for one long one.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from diffcse_runtime.errors import ModelDirError
from diffcse_runtime.model_dir import MODEL_FILE, OUTPUT_NAME, TOKENIZER_FILE, load_metadata

log = logging.getLogger("diffcse_runtime")
PROGRESS_THRESHOLD = 5000  # show_progress_bar=None shows a bar from this many texts up
_announced: set[str] = set()
# onnxruntime's CPU SkipLayerNormalization kernel measured ~1.2x slower end to end than the
# Add + LayerNormalization it replaces in the dynamically quantized graph (both math-equal;
# benchmarks/README.md, "Where encoding time goes"), and no faster in fp32: int8 keeps both.
CPU_DISABLED_FUSIONS = {"int8": ["SkipLayerNormFusion"]}


def pick_providers(requested: Sequence[str] | None = None) -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, else CPU; an explicit list is kept as given."""
    if requested:
        return list(requested)
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class Encoder:
    """Embed sentences with an exported DiffCSE (or any [CLS]-pooled) model directory.

    Follows the `encode(list[str], batch_size=..., **kwargs)` protocol of
    sentence-transformers and MTEB, so it drops into their evaluation code.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        verify_hash: bool = True,
    ) -> None:
        self.path = Path(path)
        self.meta = load_metadata(self.path, verify_hash=verify_hash)
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER_FILE))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise ModelDirError(f"{self.path / TOKENIZER_FILE}: cannot be read ({exc})") from None
        self.tokenizer.no_padding()
        self.tokenizer.enable_truncation(self.meta.max_seq_length)
        self.session = self._make_session(pick_providers(providers), intra_op_threads)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _make_session(self, providers: list[str], threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        disabled = []
        if providers[0] == "CPUExecutionProvider":
            disabled = CPU_DISABLED_FUSIONS.get(self.meta.variant, [])
        try:
            session = ort.InferenceSession(
                str(self.path / MODEL_FILE),
                sess_options=options,
                providers=providers,
                disabled_optimizers=disabled,
            )
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph types
            raise ModelDirError(
                f"{self.path / MODEL_FILE}: onnxruntime cannot load it ({exc})"
            ) from None
        used = session.get_providers()
        if providers[0] not in used:
            log.warning("%s is not usable here; running on %s", providers[0], used[0])
        if used[0] not in _announced:
            _announced.add(used[0])
            log.info("diffcse_runtime: running on %s", used[0])
        return session

    # ------------------------------------------------------------ properties

    @property
    def embedding_dim(self) -> int:
        return self.meta.embedding_dim

    @property
    def max_seq_length(self) -> int:
        return self.meta.max_seq_length

    def get_sentence_embedding_dimension(self) -> int:
        """sentence-transformers' name for `embedding_dim`."""
        return self.meta.embedding_dim

    # ------------------------------------------------------------ encoding

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        normalize: bool = False,
        show_progress_bar: bool | None = None,
        **kwargs: Any,
    ) -> np.ndarray:
        """Embed `texts`: (n, d) float32 in input order, or (d,) for a single string.

        Extra keyword arguments of the sentence-transformers/MTEB protocol are accepted;
        `normalize_embeddings=True` is honoured as an alias of `normalize`.
        """
        single = isinstance(texts, str)
        batch = [texts] if single else list(texts)
        for i, text in enumerate(batch):
            if not isinstance(text, str):
                raise TypeError(f"texts[{i}] is {type(text).__name__}, expected str")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        normalize = normalize or bool(kwargs.get("normalize_embeddings", False))
        if show_progress_bar is None:
            show_progress_bar = len(batch) >= PROGRESS_THRESHOLD
        out = self._encode_all(batch, batch_size, show_progress_bar)
        if normalize:
            out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
        return out[0] if single else out

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """An `encode_fn` for `diffcse_runtime.sts.evaluate`."""
        return self.encode(texts)

    def _encode_all(self, texts: list[str], batch_size: int, progress: bool) -> np.ndarray:
        out = np.zeros((len(texts), self.meta.embedding_dim), dtype=np.float32)
        if not texts:
            return out
        encodings = self.tokenizer.encode_batch(texts, add_special_tokens=True)
        lengths = np.fromiter((len(e.ids) for e in encodings), dtype=np.int64, count=len(texts))
        order = np.argsort(-lengths, kind="stable")  # longest first: memory peaks at once
        bar = tqdm(total=len(texts), disable=not progress, unit="text", desc="encode")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._run_batch([encodings[i].ids for i in rows], int(lengths[rows[0]]))
            bar.update(len(rows))
        bar.close()
        return out

    def _run_batch(self, ids: list[list[int]], width: int) -> np.ndarray:
        input_ids = np.full((len(ids), width), self.meta.pad_token_id, dtype=np.int64)
        mask = np.zeros((len(ids), width), dtype=np.int64)
        for row, seq in enumerate(ids):
            input_ids[row, : len(seq)] = seq
            mask[row, : len(seq)] = 1
        feed = {"input_ids": input_ids, "attention_mask": mask}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run([OUTPUT_NAME], feed)[0]

    # ------------------------------------------------------------ helpers

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity: a scalar for two vectors, else the (n, m) matrix."""
        return similarity(a, b)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Cosine similarity of embeddings: a float for two 1-D vectors, else an (n, m) matrix."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    a2 = a2 / np.maximum(np.linalg.norm(a2, axis=1, keepdims=True), 1e-12)
    b2 = b2 / np.maximum(np.linalg.norm(b2, axis=1, keepdims=True), 1e-12)
    sims = a2 @ b2.T
    return float(sims[0, 0]) if a.ndim == 1 and b.ndim == 1 else sims
