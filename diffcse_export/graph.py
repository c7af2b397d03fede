"""Load a checkpoint and export its sentence embedding as an ONNX graph, and nothing else.

The exported module is encoder -> pool -> head (-> L2 normalisation), where pool is the
model's own pooling ([CLS] state, the paper's protocol, or the masked mean over real
tokens, what sentence-transformers models were trained with) and the head is the identity
(the vector before the projector, what the paper evaluates) or, with `--with-projector`,
the training-time projector with its BatchNorms folded away. Pooling lives inside the
graph, so no caller can pool differently from PyTorch.

The pooling is read, never guessed: a diffcse-train checkpoint records it in
diffcse_head.json, a sentence-transformers folder in modules.json + 1_Pooling (with an
optional Normalize, which goes into the graph too), and a plain Hugging Face folder has
[CLS]. Asking for another pooling than the source's is allowed, and the table says so.

Export goes through torch.export (`dynamo=True`) with symbolic batch and sequence axes.
The legacy TorchScript exporter (`dynamo=False`) is not used: with SDPA attention it
produced graphs that ran but returned wrong numbers. Opset 18 is the exporter's native
opset (its ONNX functions are written for it, other opsets go through the version
converter) and is supported by onnxruntime >= 1.14, its graph optimizer and quantizer.
"""

from __future__ import annotations

import contextlib
import json
import logging
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffcse_export.checkpoint_files import BEST_SUBDIR, HEAD_FILE, PROJECTOR_FILE, PROJECTORS
from diffcse_export.cls_layer import ClsStates, prunable
from diffcse_export.errors import ExportError, first_line
from diffcse_export.fold import build_projector, fold_projector
from diffcse_runtime import builtin
from diffcse_runtime.errors import DiffcseError, ModelDirError
from diffcse_runtime.model_dir import OUTPUT_NAME
from diffcse_runtime.pooling import POOLINGS, read_source_pooling, read_st_max_seq_length
from diffcse_runtime.remote_code import refuse_custom_code

OPSET = 18
INPUT_NAMES = ["input_ids", "attention_mask"]
# Any one of these lets AutoTokenizer build the tokenizer the encoder was trained with.
TOKENIZER_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "spiece.model",
    "sentencepiece.bpe.model",
    "tokenizer.model",
)
_EXAMPLE = ["A man is playing a guitar.", "Two dogs are running through a field of grass."]


@dataclass
class Checkpoint:
    """An encoder folder loaded for export: f, its tokenizer and its (unfolded) projector."""

    path: Path
    encoder: nn.Module
    tokenizer: Any  # a transformers fast tokenizer (it has a `backend_tokenizer`)
    projector: str  # one of PROJECTORS
    head: nn.Sequential | None  # eval-mode projector with BatchNorms, None for "none"
    pooling: str = "cls"  # the pooling the graph will use ("cls" or "mean")
    normalize: bool = False  # the source ends in a Normalize module: the graph does too
    native_pooling: str = "cls"  # what the source declares (or cls for a plain HF folder)
    declared_in: str = ""  # the file that declares it; "" for a plain HF folder
    source: str = ""  # the checkpoint as the user named it (builtin:..., a relative path)

    @property
    def pooling_switched(self) -> str | None:
        """A note when the graph pools differently from what the source declares."""
        if self.pooling == self.native_pooling:
            return None
        where = self.declared_in or f"{self.path} (a plain Hugging Face folder: [CLS])"
        return (
            f"pooling {self.pooling} requested; the source declares {self.native_pooling} ({where})"
        )

    @property
    def hidden_size(self) -> int:
        return int(self.encoder.config.hidden_size)

    @property
    def num_heads(self) -> int:
        return int(self.encoder.config.num_attention_heads)

    @property
    def pad_token_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        pad = pad if pad is not None else self.encoder.config.pad_token_id
        if pad is None:
            raise ExportError(f"{self.path}: the tokenizer defines no padding token")
        return int(pad)

    def max_positions(self) -> int | None:
        """Positions the encoder can embed; RoBERTa-style tables lose padding_idx + 1 rows."""
        table = getattr(getattr(self.encoder, "embeddings", None), "position_embeddings", None)
        if not isinstance(table, nn.Embedding):
            return None
        offset = table.padding_idx + 1 if table.padding_idx is not None else 0
        return table.num_embeddings - offset


def resolve_checkpoint(path: str | Path) -> Path:
    """The encoder folder: `path` itself, `path/best` for a diffcse-train output folder, or
    the packaged folder of a `builtin:` name (the same names diffcse-train accepts)."""
    try:
        path = builtin.model_path(path)
    except DiffcseError as exc:
        raise ExportError(str(exc)) from None
    if not path.is_dir():
        raise ExportError(f"{path}: no such folder (expected a checkpoint or encoder folder)")
    if not (path / "config.json").is_file() and (path / BEST_SUBDIR / "config.json").is_file():
        return path / BEST_SUBDIR
    if not (path / "config.json").is_file():
        raise ExportError(
            f"{path}: not a checkpoint (no config.json); give the folder diffcse-train wrote "
            "or a Hugging Face encoder folder"
        )
    return path


def source_name(spec: str | Path, folder: Path) -> str:
    """`spec` as the user wrote it, never made absolute: it goes into diffcse.json and the
    model card, which travel to other machines. A run folder resolved to its best/ says so."""
    if not builtin.is_builtin(spec) and folder.name == BEST_SUBDIR and folder != Path(spec):
        return str(Path(spec) / BEST_SUBDIR)
    return str(spec)


def native_pooling(folder: Path, head: dict[str, Any] | None) -> tuple[str, bool, str]:
    """(pooling, normalize, declaring file) of a checkpoint; refuse contradicting files."""
    try:
        source = read_source_pooling(folder)
    except ModelDirError as exc:
        raise ExportError(str(exc)) from None
    if head is not None and "pooling" in head:
        pooling = head["pooling"]
        if pooling not in POOLINGS:
            raise ExportError(
                f"{folder / HEAD_FILE}: pooling {pooling!r} is not one of {', '.join(POOLINGS)}"
            )
        if source is not None and source.pooling != pooling:
            raise ExportError(
                f"{folder}: {HEAD_FILE} says pooling {pooling} but {source.declared_in} says "
                f"{source.pooling}; the checkpoint contradicts itself, so it is not exported"
            )
        return pooling, bool(head.get("normalize", False)), str(folder / HEAD_FILE)
    if source is not None:
        return source.pooling, source.normalize, source.declared_in
    return "cls", False, ""


def load_checkpoint(path: str | Path, pooling: str = "auto") -> Checkpoint:
    """Load encoder, tokenizer and projector, each failure as one ExportError sentence.

    `pooling` "auto" keeps the source's own; "cls"/"mean" is an explicit request, which
    may differ from the source's (the report then says so).
    """
    if pooling not in ("auto", *POOLINGS):
        raise ExportError(f"--pooling {pooling!r}: expected auto, cls or mean")
    from transformers import AutoModel, AutoTokenizer

    folder = resolve_checkpoint(path)
    try:
        refuse_custom_code(folder)
    except DiffcseError as exc:
        raise ExportError(str(exc)) from None
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        raise ExportError(
            f"{folder}: the tokenizer is missing (none of {', '.join(TOKENIZER_FILES)}); "
            "save the tokenizer the encoder was trained with into this folder"
        )
    try:
        encoder = AutoModel.from_pretrained(str(folder), trust_remote_code=False).eval()
    except Exception as exc:  # transformers raises OSError, ValueError, KeyError, ...
        raise ExportError(
            f"{folder}: transformers cannot load the encoder ({first_line(exc)})"
        ) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as exc:
        raise ExportError(
            f"{folder}: transformers cannot load the tokenizer ({first_line(exc)})"
        ) from None
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ExportError(f"{folder}: the tokenizer has no `tokenizers` backend to save")
    vocab = int(getattr(encoder.config, "vocab_size", 0) or 0)
    if vocab and len(tokenizer) > vocab:
        raise ExportError(
            f"{folder}: the tokenizer has {len(tokenizer)} tokens but the encoder embeds only "
            f"{vocab}; they do not belong together"
        )
    dim = int(encoder.config.hidden_size)
    head_json = _read_head_json(folder)
    kind, head = _load_head(folder, dim, head_json)
    native, normalize, declared_in = native_pooling(folder, head_json)
    chosen = native if pooling == "auto" else pooling
    return Checkpoint(
        folder, encoder, tokenizer, kind, head,
        pooling=chosen, normalize=normalize and chosen == native,
        native_pooling=native, declared_in=declared_in, source=source_name(path, folder),
    )  # fmt: skip


def _read_head_json(folder: Path) -> dict[str, Any] | None:
    path = folder / HEAD_FILE
    if not path.is_file():
        return None
    try:
        head = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ExportError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(head, dict):
        raise ExportError(f"{path}: expected a JSON object")
    return head


def _load_head(
    folder: Path, dim: int, head: dict[str, Any] | None
) -> tuple[str, nn.Sequential | None]:
    """Read diffcse_head.json + projector.safetensors; infer the kind from keys if no JSON."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = folder / PROJECTOR_FILE
    state = None
    if weights.is_file():
        try:
            state = load_file(str(weights))
        except (SafetensorError, OSError) as exc:
            raise ExportError(f"{weights}: cannot be read ({first_line(exc)})") from None
    if head is not None:
        kind = head.get("projector")
        if kind not in PROJECTORS:
            raise ExportError(
                f"{folder / HEAD_FILE}: key 'projector' is {kind!r}, expected one of "
                f"{', '.join(PROJECTORS)}"
            )
        if head.get("hidden_size", dim) != dim:
            raise ExportError(
                f"{folder / HEAD_FILE}: hidden_size {head['hidden_size']} does not match the "
                f"encoder's {dim}"
            )
    elif state is None:
        kind = "none"
    else:
        kind = "batchnorm" if "bn1.running_mean" in state else "tanh"
    if kind == "none":
        return kind, None
    if state is None:
        raise ExportError(
            f"{folder}: {HEAD_FILE} names a {kind} projector but {weights.name} is missing"
        )
    eps = float((head or {}).get("batchnorm_eps", 1e-5))
    module = build_projector(kind, dim, eps)
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise ExportError(
            f"{weights}: does not hold a {kind} projector for hidden size {dim} ({first_line(exc)})"
        ) from None
    return kind, module.eval()


HEAD_SCOPE = "head"  # SentenceEmbedding's attribute holding the projector


class SentenceEmbedding(nn.Module):
    """encoder -> pooled hidden state -> head (-> L2 norm): the whole graph export writes.

    With `prune_last` ([CLS] pooling only), the last layer runs for the [CLS] row only
    (see cls_layer.py). Mean pooling is sentence-transformers' Pooling(mean): masked sum
    over the token count clamped at 1e-9.
    """

    def __init__(
        self,
        encoder: nn.Module,
        head: nn.Module | None = None,
        prune_last: bool = False,
        pooling: str = "cls",
        normalize: bool = False,
    ) -> None:
        super().__init__()
        if prune_last and pooling != "cls":
            raise ValueError("the last layer can be pruned for [CLS] pooling only")
        self.encoder = ClsStates(encoder) if prune_last else encoder
        self.prune_last = prune_last
        self.pooling = pooling
        self.normalize = normalize
        self.head = head if head is not None else nn.Identity()

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.prune_last:
            pooled = self.encoder(input_ids, attention_mask)
        else:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)[0]
            pooled = self._pool(hidden, attention_mask)
        out = self.head(pooled)
        if self.normalize:
            out = out / out.norm(dim=-1, keepdim=True).clamp(min=1e-12)
        return out

    def _pool(self, hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.pooling == "cls":
            return hidden[:, 0]
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def embedding_modules(ckpt: Checkpoint, with_projector: bool) -> tuple[nn.Module, nn.Module]:
    """(reference, to_export): the same function; the second with the last layer pruned to
    [CLS] where the encoder and pooling allow it, and its BatchNorms folded."""
    prune = ckpt.pooling == "cls" and prunable(ckpt.encoder)
    pool = {"pooling": ckpt.pooling}
    if not with_projector:
        pool["normalize"] = ckpt.normalize
        reference = SentenceEmbedding(ckpt.encoder, **pool).eval()
        return reference, SentenceEmbedding(ckpt.encoder, prune_last=prune, **pool).eval()
    if ckpt.head is None:
        raise ExportError(
            f"{ckpt.path}: --with-projector needs {PROJECTOR_FILE}, but this checkpoint has no "
            "projector; export without --with-projector"
        )
    reference = SentenceEmbedding(ckpt.encoder, ckpt.head, **pool).eval()
    folded = fold_projector(ckpt.head)
    return reference, SentenceEmbedding(ckpt.encoder, folded, prune_last=prune, **pool).eval()


def resolve_max_seq_length(ckpt: Checkpoint, requested: int | None) -> int:
    """`requested`, or the tokenizer's limit capped by the position table; never beyond it."""
    positions = ckpt.max_positions()
    if requested is not None:
        if requested < 2:
            raise ExportError(f"--max-seq-length must be at least 2, got {requested}")
        if positions is not None and requested > positions:
            raise ExportError(
                f"--max-seq-length {requested} exceeds the {positions} positions the encoder "
                f"in {ckpt.path} can embed"
            )
        return requested
    try:
        native = read_st_max_seq_length(ckpt.path)
    except ModelDirError as exc:
        raise ExportError(str(exc)) from None
    if native is not None:  # sentence-transformers' own limit is part of its native vector
        return min(native, positions) if positions is not None else native
    limits = [int(ckpt.tokenizer.model_max_length)] if ckpt.tokenizer.model_max_length < 1e6 else []
    limits += [positions] if positions is not None else []
    return min(limits) if limits else 512


def example_inputs(ckpt: Checkpoint, max_seq_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Two sentences of different length, so the traced batch has padding."""
    enc = ckpt.tokenizer(
        _EXAMPLE, padding=True, truncation=True, max_length=max_seq_length, return_tensors="pt"
    )
    return enc["input_ids"].long(), enc["attention_mask"].long()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the exporter's warnings and info logs; errors still surface as exceptions."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "onnxscript")]
    levels = [lg.level for lg in loggers]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        try:
            yield
        finally:
            for lg, level in zip(loggers, levels, strict=True):
                lg.setLevel(level)


def export_onnx(
    module: nn.Module,
    path: Path,
    example: tuple[torch.Tensor, torch.Tensor],
    max_seq_length: int,
    opset: int = OPSET,
) -> None:
    """Write `module` as one self-contained ONNX file with dynamic batch and sequence axes."""
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=max_seq_length)
    axes = {0: batch, 1: seq}
    try:
        with _quiet(), torch.inference_mode(False):
            torch.onnx.export(
                module.eval(),
                example,
                str(path),
                input_names=INPUT_NAMES,
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                dynamic_shapes={"input_ids": axes, "attention_mask": axes},
                verbose=False,
            )
    except Exception as exc:  # torch.export raises many types; all mean "cannot export"
        raise ExportError(f"torch.onnx cannot export this encoder ({first_line(exc)})") from None


def head_nodes(onnx_path: Path) -> list[str]:
    """Names of the nodes torch.export traced inside SentenceEmbedding.head (the projector).

    The exporter records each node's module path in its `pkg.torch.onnx.name_scopes`
    metadata, e.g. ['', 'head', 'head.linear1', 'matmul'].
    """
    import ast

    import onnx

    names = []
    for node in onnx.load(str(onnx_path), load_external_data=False).graph.node:
        props = {p.key: p.value for p in node.metadata_props}
        scopes = props.get("pkg.torch.onnx.name_scopes")
        if scopes and ast.literal_eval(scopes)[1:2] == [HEAD_SCOPE]:
            names.append(node.name)
    return names
