"""Semantic search over an embedded corpus: exact cosine top-k, optional faiss/usearch.

Exact search multiplies query blocks by corpus chunks and keeps a running top-k with
argpartition, so 1M x 768 float32 never needs an n x n (or even q x n) score matrix.
An index is a plain folder: embeddings.npy (unit rows), texts.jsonl, index.json.
"""

from __future__ import annotations

import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffcse_runtime.atomic import atomic_dir
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.sts import load_task

INDEX_FORMAT = 1
BACKENDS = ("auto", "numpy", "faiss", "usearch")
SCORE_BLOCK = 1 << 24  # floats per query-block x corpus-chunk score matrix (64 MB)


@dataclass
class Hit:
    index: int
    score: float
    text: str


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


def exact_topk(queries: np.ndarray, corpus: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k inner products of each query row against corpus rows: (scores, ids), best first."""
    n, q = len(corpus), len(queries)
    k = min(k, n)
    if k == 0 or q == 0:
        return np.zeros((q, k), np.float32), np.zeros((q, k), np.int64)
    qblock = max(1, min(q, 1024))
    chunk = max(k, SCORE_BLOCK // qblock)
    best_s = np.empty((q, k), np.float32)
    best_i = np.empty((q, k), np.int64)
    for qs in range(0, q, qblock):
        qb = queries[qs : qs + qblock]
        run_s = np.full((len(qb), 0), -np.inf, np.float32)
        run_i = np.zeros((len(qb), 0), np.int64)
        for cs in range(0, n, chunk):
            scores = qb @ corpus[cs : cs + chunk].T
            kk = min(k, scores.shape[1])
            part = np.argpartition(-scores, kk - 1, axis=1)[:, :kk]
            run_s = np.concatenate([run_s, np.take_along_axis(scores, part, 1)], axis=1)
            run_i = np.concatenate([run_i, part + cs], axis=1)
            if run_s.shape[1] > k:
                keep = np.argpartition(-run_s, k - 1, axis=1)[:, :k]
                run_s, run_i = (
                    np.take_along_axis(run_s, keep, 1),
                    np.take_along_axis(run_i, keep, 1),
                )
        order = np.lexsort((run_i, -run_s), axis=1)  # by score desc, then id asc
        best_s[qs : qs + len(qb)] = np.take_along_axis(run_s, order, 1)
        best_i[qs : qs + len(qb)] = np.take_along_axis(run_i, order, 1)
    return best_s, best_i


def _resolve_backend(backend: str) -> str:
    if backend not in BACKENDS:
        raise DiffcseError(f"unknown search backend {backend!r}; choose from {', '.join(BACKENDS)}")
    if backend == "auto":
        return next((b for b in ("faiss", "usearch") if importlib.util.find_spec(b)), "numpy")
    if backend != "numpy" and importlib.util.find_spec(backend) is None:
        raise DiffcseError(
            f"search backend {backend!r} is not installed: pip install {backend}-cpu"
            if backend == "faiss"
            else f"search backend {backend!r} is not installed: pip install {backend}"
        )
    return backend


class Index:
    """Texts and their unit-normalised embeddings; `search` returns cosine top-k hits."""

    def __init__(
        self,
        embeddings: np.ndarray,
        texts: Sequence[str],
        meta: dict | None = None,
        backend: str = "numpy",
        normalized: bool = False,
    ) -> None:
        """`normalized=True` trusts rows that are already unit length (a saved index), so a
        memory-mapped embeddings.npy is used in place rather than copied."""
        if len(embeddings) != len(texts):
            raise DiffcseError(f"{len(embeddings)} embeddings for {len(texts)} texts")
        self.embeddings = embeddings if normalized else unit_rows(embeddings)
        self.texts = list(texts)
        self.meta = dict(meta or {})
        self.backend = _resolve_backend(backend)
        self._ann = None

    @classmethod
    def build(
        cls,
        encoder,
        texts: Sequence[str],
        batch_size: int = 64,
        backend: str = "numpy",
        show_progress_bar: bool | None = None,
    ) -> Index:
        """Embed `texts` with an Encoder and index them; records which model made them."""
        emb = encoder.encode(
            list(texts), batch_size=batch_size, show_progress_bar=show_progress_bar
        )
        meta = {"model": str(encoder.path.resolve()), "onnx_sha256": encoder.meta.onnx_sha256}
        return cls(emb, texts, meta, backend)

    def __len__(self) -> int:
        return len(self.texts)

    def search_vectors(self, queries: np.ndarray, k: int = 10) -> tuple[np.ndarray, np.ndarray]:
        """(scores, ids) of the top-k rows for each query vector, best first."""
        queries = unit_rows(np.atleast_2d(queries))
        if queries.shape[1] != self.embeddings.shape[1]:
            raise DiffcseError(
                f"query dimension {queries.shape[1]} does not match "
                f"the index ({self.embeddings.shape[1]})"
            )
        if self.backend == "numpy":
            return exact_topk(queries, self.embeddings, k)
        return self._ann_search(queries, min(k, len(self)))

    def _ann_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            import faiss

            if self._ann is None:
                self._ann = faiss.IndexFlatIP(self.embeddings.shape[1])
                self._ann.add(self.embeddings)
            scores, ids = self._ann.search(queries, k)
            return scores, ids.astype(np.int64)
        from usearch.index import Index as UIndex

        if self._ann is None:
            self._ann = UIndex(ndim=self.embeddings.shape[1], metric="ip", dtype="f32")
            self._ann.add(np.arange(len(self), dtype=np.uint64), self.embeddings)
        matches = self._ann.search(queries, k)
        return 1.0 - matches.distances.astype(np.float32), matches.keys.astype(np.int64)

    def search(self, encoder, queries: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Embed `queries` with `encoder` and return the top-k hits of each."""
        qs = [queries] if isinstance(queries, str) else list(queries)
        scores, ids = self.search_vectors(encoder.encode(qs), k)
        return [
            [Hit(int(i), float(s), self.texts[i]) for s, i in zip(srow, irow, strict=True)]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def save(self, path: str | Path, overwrite: bool = False) -> None:
        """Write the index folder atomically."""
        try:
            with atomic_dir(path, overwrite=overwrite) as tmp:
                np.save(tmp / "embeddings.npy", self.embeddings)
                with open(tmp / "texts.jsonl", "w", encoding="utf-8") as fh:
                    for text in self.texts:
                        fh.write(json.dumps(text, ensure_ascii=False) + "\n")
                meta = {
                    **self.meta,
                    "format_version": INDEX_FORMAT,
                    "size": len(self),
                    "dim": int(self.embeddings.shape[1]),
                }
                (tmp / "index.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        except FileExistsError:
            raise DiffcseError(f"{path} already exists (use --overwrite to replace it)") from None

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy") -> Index:
        path = Path(path)
        files = [path / n for n in ("embeddings.npy", "texts.jsonl", "index.json")]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DiffcseError(f"{path}: not an index folder, missing {', '.join(missing)}")
        meta = json.loads(files[2].read_text(encoding="utf-8"))
        if meta.get("format_version", 0) > INDEX_FORMAT:
            raise DiffcseError(
                f"{files[2]}: index format {meta['format_version']} is newer than this runtime"
            )
        emb = np.load(files[0], mmap_mode="r")
        texts = [json.loads(line) for line in files[1].read_text(encoding="utf-8").splitlines()]
        return cls(emb, texts, meta, backend, normalized=True)


def recall_at_k(
    encode: Callable[[list[str]], np.ndarray],
    data_dir: str | Path,
    split: str = "test",
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Retrieval as in DiffCSE section 6.2 on STS-B.

    Every pair with gold 5.0 gives two queries (each sentence retrieves its partner) over
    all distinct sentences of the split; the query itself is excluded from its results.
    """
    pairs = load_task(data_dir, "STSBenchmark", split)
    corpus = list(dict.fromkeys(pairs.sents1 + pairs.sents2))
    pos = {s: i for i, s in enumerate(corpus)}
    queries = [
        (pos[a], pos[b])
        for a, b, g in zip(pairs.sents1, pairs.sents2, pairs.gold, strict=True)
        if g == 5.0 and a != b
    ]
    queries += [(t, q) for q, t in queries]
    emb = unit_rows(encode(corpus))
    _, ids = exact_topk(emb[[q for q, _ in queries]], emb, max(ks) + 1)
    hits = {k: 0 for k in ks}
    for (q, target), row in zip(queries, ids, strict=True):
        ranked = [i for i in row if i != q]
        for k in ks:
            hits[k] += target in ranked[:k]
    return {f"recall@{k}": 100.0 * hits[k] / max(len(queries), 1) for k in ks} | {
        "queries": len(queries)
    }
