"""Encoder: sentence embeddings from a model directory with onnxruntime, no torch.

The pipeline is cut -> tokenize (one Rust batch call) -> sort by token length -> pad each
batch only to its own longest row -> session.run -> put rows back in input order. Sorting by
length is what makes batching cheap: a batch of short sentences never pays for one long one.

Three properties make it usable in batch jobs and servers:

- Work per text is bounded. The tokenizers library tokenizes a whole text before it
  truncates, so one 10 MB line used to cost 1.6 GB and 9 s. A text longer than a window of
  `CUT_CHARS_PER_TOKEN * max_seq_length` characters is cut first, at a point proven not to
  change the tokens the model keeps, or, where no proof is found within the hard bound, at
  that bound, counted as truncated (see `diffcse_runtime.truncation.find_cuts`).
- Truncation is visible: `encode` logs one WARNING with the count and the longest length,
  or hands the per-text counts back with `return_token_counts=True`.
- An `Encoder` pickles by path and settings, so multiprocessing, Ray and Spark workers
  rebuild their own onnxruntime session (`diffcse_runtime.parallel` uses this).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
from tokenizers import Encoding, Tokenizer
from tqdm.auto import tqdm

from diffcse_runtime import mteb_compat
from diffcse_runtime import providers as provider_checks
from diffcse_runtime.conventions import (
    Finish,
    check_dim,
    check_extra_options,
    check_precision,
    resolve_prompt,
    truncate_dims,
)
from diffcse_runtime.errors import ModelDirError
from diffcse_runtime.inputs import as_text_list, iter_text_chunks
from diffcse_runtime.model_dir import MODEL_FILE, OUTPUT_NAME, TOKENIZER_FILE, load_metadata
from diffcse_runtime.openvino_backend import (
    OpenVINOSession,
    bf16_validated,
    check_backend,
    gate_warning,
    resolve_backend,
)
from diffcse_runtime.truncation import (
    CUT_CHARS_PER_TOKEN,
    CUT_MAX_CHARS_PER_TOKEN,
    TOKENIZE_CHUNK_CHARS,
    Cut,
    TokenCounts,
    TruncationTally,
    char_chunks,
    find_cuts,
    warn_truncation,
)

log = logging.getLogger("diffcse_runtime")
PROGRESS_THRESHOLD = 5000  # show_progress_bar=None shows a bar from this many texts up
EMBED_CHUNK_SIZE = 8192  # texts read, tokenized and held at once by Encoder.embed
_announced: set[str] = set()
# onnxruntime's CPU SkipLayerNormalization kernel measured ~1.2x slower end to end than the
# Add + LayerNormalization it replaces in the dynamically quantized graph (both math-equal;
# benchmarks/notes/runtime.md), and no faster in fp32: int8 keeps both.
CPU_DISABLED_FUSIONS = {"int8": ["SkipLayerNormFusion"]}


def pick_providers(requested: Sequence[str] | None = None) -> list[str]:
    """CUDA first when onnxruntime-gpu offers it, else CPU; an explicit list is kept as given."""
    if requested:
        return list(requested)
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    provider_checks.warn(provider_checks.cpu_only_reason(available))
    return ["CPUExecutionProvider"]


class Encoder:
    """Embed sentences with an exported DiffCSE (or any [CLS]/mean-pooled) model directory.

    Follows the `encode(list[str], batch_size=..., **kwargs)` protocol of
    sentence-transformers and MTEB, so it drops into their evaluation code, and fastembed's
    `embed(iterable)` generator for corpora that do not fit in memory. sentence-transformers'
    own options mean what they mean there (prompts, `encode_query`/`encode_document`,
    `truncate_dim`, `precision`); the ones that cannot apply are refused, never ignored.
    """

    def __init__(
        self,
        path: str | Path,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        verify_hash: bool = True,
        spin: bool = True,
        truncate_dim: int | None = None,
        backend: str = "auto",
        inference_precision: str = "f32",
        streams: int = 1,
    ) -> None:
        """`truncate_dim`: every vector `encode`/`embed` return keeps its first this many
        dimensions (renormalised when unit-length), as sentence-transformers' does.

        `backend`: "onnxruntime", "openvino" (extra `diffcse[openvino]`) or "auto" (OpenVINO
        when installed, the model would run on the CPU and the CPU has VNNI, AVX512-BF16 or
        AMX, where it beat onnxruntime; see `openvino_backend.cpu_favours_openvino`); the
        one chosen is `self.backend`. `inference_precision` (OpenVINO only): "f32" (the
        default: the numbers the export gate validated), "auto" (bf16 where the CPU has
        AVX512-BF16 or AMX and the export's gate passed this model's OpenVINO bf16 leg, else
        f32: faster on long batches), or "bf16"; the effective one is
        `self.inference_precision` (None on onnxruntime: the graph's own types). `streams`
        (OpenVINO only): batches run at once from different threads (a server's workers),
        each on `intra_op_threads` threads; one onnxruntime session needs no such setting."""
        if intra_op_threads is not None and (
            not isinstance(intra_op_threads, int) or intra_op_threads < 0
        ):
            raise ValueError(
                f"intra_op_threads must be an int >= 0 (0 or None: onnxruntime chooses), "
                f"got {intra_op_threads!r}"
            )
        self.path = Path(path)
        self._settings = {
            "providers": list(providers) if providers else None,
            "intra_op_threads": intra_op_threads,
            "verify_hash": verify_hash,
            "spin": spin,
            "truncate_dim": truncate_dim,
            "backend": backend,
            "inference_precision": inference_precision,
            "streams": streams,
        }
        check_backend(backend, inference_precision, streams)
        self.meta = load_metadata(self.path, verify_hash=verify_hash)
        if truncate_dim is not None:
            truncate_dim = check_dim(truncate_dim, self.meta.embedding_dim)
        self.truncate_dim = truncate_dim
        # sentence-transformers' attribute names, and its defaults: an empty "query" and
        # "document" prompt unless the model names them (so encode_document never falls
        # back to a "passage" prompt there either, and vectors match it for the same model)
        self.prompts = {"query": "", "document": "", **self.meta.prompts}
        self.default_prompt_name = self.meta.default_prompt_name
        try:
            self.tokenizer = Tokenizer.from_file(str(self.path / TOKENIZER_FILE))
        except Exception as exc:  # the tokenizers library raises plain Exception subclasses
            raise ModelDirError(f"{self.path / TOKENIZER_FILE}: cannot be read ({exc})") from None
        self.tokenizer.no_padding()
        self._untruncated: Tokenizer | None = None  # for window checks, built on first use
        self.tokenizer.enable_truncation(self.meta.max_seq_length)
        self._n_special = self.tokenizer.num_special_tokens_to_add(False)
        chosen = pick_providers(providers) if backend != "openvino" else ["CPUExecutionProvider"]
        self.backend = resolve_backend(backend, inference_precision, chosen, bool(providers))
        self.inference_precision: str | None = None  # onnxruntime: the graph's own types
        if self.backend == "openvino":
            self.session = OpenVINOSession(
                self.path / MODEL_FILE,
                intra_op_threads,
                inference_precision,
                streams,
                bf16_allowed=bf16_validated(self.meta.validation),
            )
            self.inference_precision = self.session.precision
            provider_checks.warn(gate_warning(self.meta.validation, self.session.precision))
        else:
            self.session = self._make_session(chosen, intra_op_threads)
        self._inputs = {i.name for i in self.session.get_inputs()}

    def _make_session(self, providers: list[str], threads: int | None) -> ort.InferenceSession:
        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if threads:
            options.intra_op_num_threads = threads
        if not self._settings["spin"]:  # idle pool threads sleep instead of busy-waiting
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
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
        available = ort.get_available_providers()
        provider_checks.warn(provider_checks.fallback_reason(providers, available, used))
        if used[0] not in _announced:
            _announced.add(used[0])
            log.info("diffcse_runtime: running on %s", used[0])
        return session

    # ------------------------------------------------------------ pickling

    def __getstate__(self) -> dict[str, Any]:
        """Path and settings only: an onnxruntime session cannot cross a process boundary,
        and a worker loading the model itself is cheaper than shipping its bytes."""
        return {"path": str(self.path), "onnx_sha256": self.meta.onnx_sha256, **self._settings}

    def __setstate__(self, state: dict[str, Any]) -> None:
        """Rebuild the session here; refuse a model that changed since it was pickled."""
        self.__init__(
            state["path"],
            providers=state["providers"],
            intra_op_threads=state["intra_op_threads"],
            verify_hash=state["verify_hash"],
            spin=state.get("spin", True),
            truncate_dim=state.get("truncate_dim"),
            backend=state.get("backend", "auto"),
            inference_precision=state.get("inference_precision", "f32"),
            streams=state.get("streams", 1),
        )
        if state["onnx_sha256"] != self.meta.onnx_sha256:
            raise ModelDirError(
                f"{self.path}: holds a different model than the Encoder that was pickled "
                "(model.onnx hash differs); workers would embed into another space"
            )

    # ------------------------------------------------------------ properties

    @property
    def embedding_dim(self) -> int:
        return self.meta.embedding_dim

    @property
    def max_seq_length(self) -> int:
        return self.meta.max_seq_length

    def get_sentence_embedding_dimension(self) -> int:
        """The width `encode` returns: `truncate_dim` if set, else `embedding_dim` (as in
        sentence-transformers)."""
        return self.truncate_dim or self.meta.embedding_dim

    @property
    def mteb_model_meta(self) -> Any:
        """What MTEB v2 reads about the model (an mteb ModelMeta; needs mteb installed)."""
        return mteb_compat.model_meta(self)

    # ------------------------------------------------------------ encoding

    def encode(
        self,
        texts: str | Sequence[str],
        batch_size: int = 64,
        normalize: bool = False,
        show_progress_bar: bool | None = None,
        return_token_counts: bool = False,
        *,
        prompt_name: str | None = None,
        prompt: str | None = None,
        truncate_dim: int | None = None,
        precision: str = "float32",
        calibration_embeddings: np.ndarray | None = None,
        ranges: np.ndarray | None = None,
        normalize_embeddings: bool = False,
        **kwargs: Any,
    ) -> np.ndarray | tuple[np.ndarray, TokenCounts]:
        """Embed `texts`: (n, d) float32 in input order, or (d,) for a single string.

        Texts longer than `max_seq_length` tokens are truncated, and one WARNING says how
        many and the longest length. With `return_token_counts=True` the result is
        `(embeddings, TokenCounts)` instead, and nothing is logged: the caller has the counts.

        sentence-transformers' options, with its meaning:
        - `prompt` (text put before every input) or `prompt_name` (one of `self.prompts`,
          from diffcse.json); neither: the model's `default_prompt_name`, if any. The prompt
          is part of the text the model reads, so its tokens count towards `max_seq_length`
          and, for mean pooling, are averaged in (sentence-transformers' default,
          `include_prompt=True`).
        - `truncate_dim`: keep the first dimensions (default: the Encoder's own), renormalised
          when the rows are unit-length (`normalize`, or a model that normalises).
        - `normalize_embeddings`: an alias of `normalize`.
        - `precision`: float32, int8, uint8, binary or ubinary, quantized as
          `sentence_transformers.quantization.quantize_embeddings` does. int8/uint8 take
          each dimension's range from `ranges` (2, d), else `calibration_embeddings`, else
          this call's own embeddings (then a text's code depends on the others in the call:
          pass one of the two for stable codes).
        - MTEB's `task_metadata`, `hf_split`, `hf_subset`, `task_name` are accepted;
          `prompt_type` ("query"/"document") picks the prompt as encode_query/_document do.
        - `convert_to_numpy=True`, `convert_to_tensor=False`, `output_value=
          "sentence_embedding"`, `device=None`, `pool=None`, `chunk_size=None` are accepted;
          any other value of these, or any other option, raises ValueError with the reason.
        """
        kind = check_extra_options(kwargs)
        prefix = resolve_prompt(self.prompts, self.default_prompt_name, prompt, prompt_name, kind)
        dim = self.truncate_dim if truncate_dim is None else truncate_dim
        finish = Finish(
            truncate_dim=None if dim is None else check_dim(dim, self.meta.embedding_dim),
            normalize=bool(normalize or normalize_embeddings),
            model_normalized=self.meta.normalized,
            precision=check_precision(precision),
            ranges=ranges,
            calibration_embeddings=calibration_embeddings,
        )
        texts = mteb_compat.texts_of(texts)  # MTEB v2: a DataLoader of {'text': [...]}
        batch, single = as_text_list(texts)
        _check_batch_size(batch_size)
        finish.check(len(batch), self.meta.embedding_dim)
        if show_progress_bar is None:
            show_progress_bar = len(batch) >= PROGRESS_THRESHOLD
        if prefix:
            batch = [prefix + text for text in batch]
        out, counts = self._encode_all(batch, batch_size, show_progress_bar)
        out = finish.apply(out)
        if not return_token_counts:
            warn_truncation(counts.tally())
            return out[0] if single else out
        return (out[0], counts) if single else (out, counts)

    def encode_query(
        self, texts: str | Sequence[str], **kwargs: Any
    ) -> np.ndarray | tuple[np.ndarray, TokenCounts]:
        """`encode` with the model's "query" prompt when it has one and none is given
        (sentence-transformers 5's `encode_query`); takes every `encode` option."""
        return self.encode(texts, **{**kwargs, "prompt_type": "query"})

    def encode_document(
        self, texts: str | Sequence[str], **kwargs: Any
    ) -> np.ndarray | tuple[np.ndarray, TokenCounts]:
        """`encode` with the model's "document" (else "passage", else "corpus") prompt when
        it has one and none is given (sentence-transformers 5's `encode_document`)."""
        return self.encode(texts, **{**kwargs, "prompt_type": "document"})

    def embed(
        self,
        texts: Iterable[str],
        batch_size: int = 64,
        chunk_size: int = EMBED_CHUNK_SIZE,
        normalize: bool = False,
    ) -> Iterator[np.ndarray]:
        """Yield one (d,) float32 embedding per text, in input order, as fastembed does.

        `texts` may be any iterable, e.g. a generator over a file of any size: it is read
        `chunk_size` texts at a time, each chunk tokenized, length-sorted into batches and
        encoded before the next is read, so memory is bounded by the chunk, not the input.
        The rows of one chunk are views of one (chunk, d) array. Truncation is logged once,
        as a total, when the generator finishes. The Encoder's `truncate_dim` and the
        model's default prompt (`default_prompt_name`) apply, as they do in `encode`.
        """
        _check_batch_size(batch_size)
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
        tally = TruncationTally(self.max_seq_length)
        prefix = resolve_prompt(self.prompts, self.default_prompt_name)
        for chunk in iter_text_chunks(texts, chunk_size):
            if prefix:
                chunk = [prefix + text for text in chunk]
            out, counts = self._encode_all(chunk, batch_size, progress=False)
            tally.add(counts)
            if self.truncate_dim is not None:
                out = truncate_dims(out, self.truncate_dim, normalize or self.meta.normalized)
            elif normalize:
                _normalize_rows(out)
            yield from out
        warn_truncation(tally)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """An `encode_fn` for `diffcse_runtime.sts.evaluate`."""
        return self.encode(texts)

    def _encode_all(
        self, texts: list[str], batch_size: int, progress: bool
    ) -> tuple[np.ndarray, TokenCounts]:
        out = np.zeros((len(texts), self.meta.embedding_dim), dtype=np.float32)
        ids, counts = self._tokenize(texts)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        order = np.argsort(-lengths, kind="stable")  # longest first: memory peaks at once
        bar = tqdm(total=len(texts), disable=not progress, unit="text", desc="encode")
        for start in range(0, len(texts), batch_size):
            rows = order[start : start + batch_size]
            out[rows] = self._run_batch([ids[i] for i in rows], lengths[rows])
            bar.update(len(rows))
        bar.close()
        return out, counts

    def tokenize(
        self, texts: Sequence[str], *, prompt: str | None = None, prompt_name: str | None = None
    ) -> tuple[list[list[int]], TokenCounts]:
        """Token ids as the model reads them (truncated, special tokens added) and the
        counts before truncation, with bounded work and memory per text.

        A server counts and encodes from this one tokenization: `encode_token_ids` runs the
        model on the ids without tokenizing again. Texts are checked and prompted as in
        `encode` (the model's default prompt when none is named), so the rows match it.
        """
        batch, _ = as_text_list(texts)
        prefix = resolve_prompt(self.prompts, self.default_prompt_name, prompt, prompt_name)
        return self._tokenize([prefix + text for text in batch] if prefix else batch)

    def encode_token_ids(self, ids: Sequence[Sequence[int]], normalize: bool = False) -> np.ndarray:
        """(n, d) float32 rows for ids from `tokenize`, in one session run (the caller
        batches; rows are padded to the longest)."""
        if not ids:
            return np.zeros((0, self.meta.embedding_dim), dtype=np.float32)
        lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(ids))
        if lengths.min() < 1 or lengths.max() > self.max_seq_length:
            raise ValueError(f"each row of ids must hold 1 to {self.max_seq_length} token ids")
        out = self._run_batch(ids, lengths)
        if normalize:
            _normalize_rows(out)
        return out

    def _tokenize(self, texts: list[str]) -> tuple[list[list[int]], TokenCounts]:
        """Token ids (truncated, special tokens added) and the counts before truncation.

        Long texts are cut first (`truncation.find_cuts`), and the texts go to the tokenizer
        in calls of at most TOKENIZE_CHUNK_CHARS characters, keeping only ids and counts
        between calls: memory is bounded by the chunk, not by the request or the longest text.
        """
        window = CUT_CHARS_PER_TOKEN * self.max_seq_length
        long = {i: t for i, t in enumerate(texts) if len(t) > window}
        cuts: dict[int, Cut] = {}
        if long:  # the untruncated tokenizer copy is made only for a long text
            cuts = find_cuts(long, self._window_tokenizer(), self.max_seq_length, self._n_special)
        if cuts:
            texts = [t[: cuts[i].at] if i in cuts else t for i, t in enumerate(texts)]
        ids: list[list[int]] = []
        counts = np.zeros(len(texts), dtype=np.int64)
        for start, stop in char_chunks(list(map(len, texts)), TOKENIZE_CHUNK_CHARS):
            encodings = self.tokenizer.encode_batch(texts[start:stop], add_special_tokens=True)
            counts[start:stop] = [self._count(e) for e in encodings]
            ids.extend(e.ids for e in encodings)
            del encodings
        windowed = np.zeros(len(texts), dtype=bool)
        hard_cut = np.zeros(len(texts), dtype=bool)
        for i, cut in cuts.items():
            counts[i] = max(int(counts[i]), cut.tokens)
            windowed[i], hard_cut[i] = True, not cut.proven
        cut_at = CUT_MAX_CHARS_PER_TOKEN * self.max_seq_length
        return ids, TokenCounts(counts, windowed, hard_cut, self.max_seq_length, cut_at)

    def _count(self, encoding: Encoding) -> int:
        """Tokens before truncation: the kept ones plus the overflowing pieces' own tokens."""
        if not encoding.overflowing:
            return len(encoding)
        pieces = [encoding, *encoding.overflowing]
        content = sum(len(p) - sum(p.special_tokens_mask) for p in pieces)
        return content + self._n_special

    def _window_tokenizer(self) -> Tokenizer:
        """A copy of the tokenizer without truncation, made only when a long text needs it
        (it costs a second parse of tokenizer.json, which most short-text jobs never pay)."""
        if self._untruncated is None:
            self._untruncated = Tokenizer.from_str(self.tokenizer.to_str())
            self._untruncated.no_truncation()
        return self._untruncated

    def _run_batch(self, ids: list[list[int]], lengths: np.ndarray) -> np.ndarray:
        width = int(lengths.max())
        mask = np.arange(width) < lengths[:, None]
        input_ids = np.full((len(ids), width), self.meta.pad_token_id, dtype=np.int64)
        flat = itertools.chain.from_iterable(ids)
        input_ids[mask] = np.fromiter(flat, dtype=np.int64, count=int(lengths.sum()))
        feed = {"input_ids": input_ids, "attention_mask": mask.astype(np.int64)}
        if "token_type_ids" in self._inputs:
            feed["token_type_ids"] = np.zeros_like(input_ids)
        return self.session.run([OUTPUT_NAME], feed)[0]

    # ------------------------------------------------------------ helpers

    @staticmethod
    def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine similarity: a scalar for two vectors, else the (n, m) matrix."""
        return similarity(a, b)

    @staticmethod
    def similarity_pairwise(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        """Cosine of row i of `a` with row i of `b`: (n,) (sentence-transformers/MTEB name)."""
        return mteb_compat.pairwise_cosine(a, b)


def _check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")


def _normalize_rows(out: np.ndarray) -> None:
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)


def similarity(a: np.ndarray, b: np.ndarray) -> np.ndarray | float:
    """Cosine similarity of embeddings: a float for two 1-D vectors, else an (n, m) matrix."""
    a, b = np.asarray(a, dtype=np.float32), np.asarray(b, dtype=np.float32)
    a2, b2 = np.atleast_2d(a), np.atleast_2d(b)
    a2 = a2 / np.maximum(np.linalg.norm(a2, axis=1, keepdims=True), 1e-12)
    b2 = b2 / np.maximum(np.linalg.norm(b2, axis=1, keepdims=True), 1e-12)
    sims = a2 @ b2.T
    return float(sims[0, 0]) if a.ndim == 1 and b.ndim == 1 else sims
