"""Semantic search over an embedded corpus: exact cosine top-k, optional faiss/usearch.

Exact search multiplies query blocks by corpus chunks and keeps a running top-k with
argpartition, so 1M x 768 float32 never needs an n x n (or even q x n) score matrix.
An index is a plain folder: embeddings.npy (unit rows), texts.jsonl, index.json.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from diffcse_runtime.atomic import atomic_dir
from diffcse_runtime.errors import DataFormatError, DiffcseError
from diffcse_runtime.sts import load_task

INDEX_FORMAT = 1
BACKENDS = ("auto", "numpy", "faiss", "usearch")
SCORE_BLOCK = 1 << 24  # floats per query-block x corpus-chunk score matrix (64 MB)
INDEX_FILE = "index.json"
INDEX_TOOL = "diffcse-search"  # the tool an index folder's ownership manifest names
FILES = ("embeddings.npy", "texts.jsonl")
SAMPLE_BYTES = 1 << 20  # the cheap check hashes this much at the start and at the end


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
            if not np.isfinite(scores).all():
                bad = cs + int(np.flatnonzero(~np.isfinite(scores).all(axis=0))[0])
                raise DiffcseError(f"corpus row {bad} is not finite (NaN or infinite values)")
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
        if not normalized:
            _check_finite(np.asarray(embeddings), "embeddings")
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
        meta = {
            "model": str(encoder.path.resolve()),
            "onnx_sha256": encoder.meta.onnx_sha256,
            "model_files": dict(encoder.meta.files),
        }
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
        if not np.isfinite(queries).all():
            raise DiffcseError("a query vector holds NaN or infinite values")
        if self._ann is None:
            self._ann = self._build_ann()
        return self._ann_search(queries, min(k, len(self)))

    def _build_ann(self):
        """The faiss/usearch structure over every row, refused if any row is not finite.

        Exact search finds a NaN row as it scores it; faiss and usearch silently leave such
        a row out of every answer (its own text no longer finds it), so the rows are checked
        here, once, before the libraries see them: a pass that costs about as much as
        reading the rows, far less than building the index.
        """
        _check_finite(self.embeddings, "embeddings")
        dim = self.embeddings.shape[1]
        if self.backend == "faiss":
            import faiss

            ann = faiss.IndexFlatIP(dim)
            ann.add(np.ascontiguousarray(self.embeddings, dtype=np.float32))
            return ann
        from usearch.index import Index as UIndex

        ann = UIndex(ndim=dim, metric="ip", dtype="f32")
        ann.add(np.arange(len(self), dtype=np.uint64), self.embeddings)
        return ann

    def _ann_search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.backend == "faiss":
            scores, ids = self._ann.search(queries, k)
            return scores, ids.astype(np.int64)
        matches = self._ann.search(queries, k)
        # usearch answers one query with 1-D arrays and a batch with 2-D ones
        keys = np.asarray(matches.keys, dtype=np.int64).reshape(len(queries), -1)
        dist = np.asarray(matches.distances, dtype=np.float32).reshape(len(queries), -1)
        counts = np.atleast_1d(getattr(matches, "counts", len(matches)))
        if (counts < k).any():  # HNSW found fewer than k rows: never pad with made-up ids
            raise DiffcseError(
                f"the usearch index returned {int(counts.min())} of the {k} requested hits; "
                "use --backend numpy or faiss for exact results"
            )
        return 1.0 - dist[:, :k], keys[:, :k]

    def search(self, encoder, queries: str | Sequence[str], k: int = 10) -> list[list[Hit]]:
        """Embed `queries` with `encoder` and return the top-k hits of each."""
        qs = [queries] if isinstance(queries, str) else list(queries)
        scores, ids = self.search_vectors(encoder.encode(qs), k)
        return [
            [Hit(int(i), float(s), self.texts[i]) for s, i in zip(srow, irow, strict=True)]
            for srow, irow in zip(scores, ids, strict=True)
        ]

    def save(
        self, path: str | Path, overwrite: bool = False, inputs: Sequence[str | Path] = ()
    ) -> None:
        """Write the index folder atomically, with checksums that `load` verifies.

        `overwrite` replaces only an index folder whose manifest lists every entry in it,
        never a user's folder, the working directory or a folder holding one of `inputs`.
        """
        try:
            with atomic_dir(path, overwrite, INDEX_TOOL, "an index folder", inputs) as tmp:
                self._write_files(tmp, Path(path))
        except FileExistsError:
            raise DiffcseError(f"{path} already exists (use --overwrite to replace it)") from None

    def _write_files(self, tmp: Path, final: Path) -> None:
        """The index files, written into the staging folder `tmp`.

        A failed write (a full disk) is one sentence naming the file as the user knows it,
        FINAL/NAME, never the hidden staging path, and the reason: numpy's own message for
        a short write ("115200 requested and 16352 written") names neither.
        """
        name = FILES[0]
        try:
            _write_npy(tmp / name, self.embeddings)
            name = FILES[1]
            with open(tmp / name, "w", encoding="utf-8") as fh:
                for text in self.texts:
                    fh.write(json.dumps(text, ensure_ascii=False) + "\n")
            name = INDEX_FILE
            meta = {
                **self.meta,
                "format_version": INDEX_FORMAT,
                "size": len(self),
                "dim": int(self.embeddings.shape[1]),
                "checksums": {n: file_checksums(tmp / n) for n in FILES},
            }
            body = json.dumps(meta, indent=2, allow_nan=False) + "\n"
            (tmp / name).write_text(body, encoding="utf-8")
        except OSError as exc:
            raise DiffcseError(f"{final / name}: cannot write it ({exc.strerror or exc})") from None

    @classmethod
    def load(cls, path: str | Path, backend: str = "numpy", verify: str = "sample") -> Index:
        """Read an index folder, checked as `verify` says.

        "sample" (the default): file sizes, a SHA-256 of each file's first and last MB, and
        every row checked to be finite. "full": the same with every byte hashed. "none".

        Why the default reads every row but hashes only a sample: a NaN row is the one
        tamper that changes answers silently (faiss and usearch drop it from every result),
        and the finiteness pass that catches it costs ~10 ms on a 100k x 384 float32 file
        (150 MB, measured warm), next to ~1 ms for the sample hash and ~100 ms for a full
        SHA-256 (~2 s at 1M x 768, on every load). Sizes and the sample catch a truncated or
        replaced file; other edits to finite values cost no more than a stale index, so the
        full hash stays opt-in (`--verify-index`) for folders that others may have edited.
        """
        path = Path(path)
        if not path.is_dir():
            raise DiffcseError(f"{path}: no such index folder")
        files = [path / n for n in (*FILES, INDEX_FILE)]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DiffcseError(f"{path}: not an index folder, missing {', '.join(missing)}")
        meta = _read_index_json(files[2])
        if verify != "none":
            _verify_checksums(path, meta, full=verify == "full")
        emb = _load_embeddings(files[0], meta)
        texts = _read_texts(files[1])
        if len(texts) != len(emb):
            raise DiffcseError(
                f"{files[1]}: {len(texts)} texts but {files[0].name} has {len(emb)} rows"
            )
        if verify != "none":
            _check_finite(emb, str(files[0]))
        return cls(emb, texts, meta, backend, normalized=True)


def _write_npy(path: Path, emb: np.ndarray) -> None:
    """A float32 .npy written block by block through Python's file object, whose errors
    carry errno (ENOSPC, EFBIG) where numpy's `tofile` reports only a byte count."""
    header = {"descr": "<f4", "fortran_order": False, "shape": tuple(emb.shape)}
    with open(path, "wb") as fh:
        np.lib.format.write_array_header_1_0(fh, header)
        for start in range(0, len(emb), FINITE_BLOCK):
            block = np.ascontiguousarray(emb[start : start + FINITE_BLOCK], dtype="<f4")
            fh.write(block.tobytes())


FINITE_BLOCK = 1 << 14  # rows per block of the finiteness pass (bounded memory on a memmap)


def _check_finite(emb: np.ndarray, where: str) -> None:
    """Every row finite, else name the first bad one. Block by block, so a memory-mapped
    file of any size needs one block of memory, not a boolean copy of the whole file."""
    for start in range(0, len(emb), FINITE_BLOCK):
        finite = np.isfinite(emb[start : start + FINITE_BLOCK]).all(axis=1)
        if not finite.all():
            row = start + int(np.flatnonzero(~finite)[0])
            raise DiffcseError(
                f"{where}: row {row} holds NaN or infinite values; rebuild the index"
            )


def file_checksums(path: Path) -> dict:
    """Size, SHA-256 of the whole file, and SHA-256 of its first and last SAMPLE_BYTES."""
    full = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(1 << 20):
            full.update(chunk)
    return {"size": path.stat().st_size, "sha256": full.hexdigest(), "sample": _sample_hash(path)}


def _sample_hash(path: Path) -> str:
    size = path.stat().st_size
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        digest.update(fh.read(SAMPLE_BYTES))
        fh.seek(max(0, size - SAMPLE_BYTES))
        digest.update(fh.read(SAMPLE_BYTES))
    return digest.hexdigest()


def _verify_checksums(path: Path, meta: dict, full: bool) -> None:
    recorded = meta.get("checksums")
    if recorded is None:  # an index from before checksums: nothing to compare with
        return
    for name in FILES:
        want = recorded.get(name) if isinstance(recorded, dict) else None
        if not isinstance(want, dict):
            raise DiffcseError(
                f"{path / INDEX_FILE}: checksums for {name} are missing or malformed"
            )
        file = path / name
        if file.stat().st_size != want.get("size"):
            got = file.stat().st_size
            raise DiffcseError(
                f"{file}: {got} bytes, but the index recorded {want.get('size')}; the file was "
                "changed or truncated after the build (rebuild the index)"
            )
        key, actual = (
            ("sha256", file_checksums(file)["sha256"])
            if full
            else (
                "sample",
                _sample_hash(file),
            )
        )
        if actual != want.get(key):
            raise DiffcseError(
                f"{file}: checksum does not match the one recorded at build; the file was "
                "changed after the build (rebuild the index)"
            )


def _read_index_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DiffcseError(f"{path}: not valid JSON ({exc}); rebuild the index") from None
    if not isinstance(meta, dict):
        raise DiffcseError(f"{path}: expected a JSON object; rebuild the index")
    version = meta.get("format_version", 0)
    if not isinstance(version, int) or isinstance(version, bool):
        raise DiffcseError(f"{path}: 'format_version' is not an integer")
    if version > INDEX_FORMAT:
        raise DiffcseError(f"{path}: index format {version} is newer than this runtime")
    return meta


def _load_embeddings(path: Path, meta: dict) -> np.ndarray:
    try:
        emb = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise DiffcseError(f"{path}: not a readable .npy file ({exc}); rebuild the index") from None
    if emb.ndim != 2 or emb.dtype != np.float32:
        raise DiffcseError(f"{path}: expected a 2-D float32 array, found {emb.dtype} {emb.shape}")
    dim = meta.get("dim")
    if dim is not None and emb.shape[1] != dim:
        raise DiffcseError(f"{path}: rows of dimension {emb.shape[1]}, index.json says {dim}")
    return emb


def _read_texts(path: Path) -> list[str]:
    texts = []
    with open(path, "rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                text = json.loads(raw.decode("utf-8"))
            except UnicodeDecodeError:
                raise DataFormatError(f"{path}:{lineno}: not valid UTF-8") from None
            except json.JSONDecodeError:
                raise DataFormatError(f"{path}:{lineno}: not a JSON string") from None
            if not isinstance(text, str):
                raise DataFormatError(f"{path}:{lineno}: expected a JSON string")
            texts.append(text)
    return texts


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
