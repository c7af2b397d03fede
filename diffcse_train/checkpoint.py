"""Checkpoints on disk: the `best` model that export reads, and the resumable `last` state.

Layout of a training output directory (every folder is written to a temporary path and
renamed into place, so a crash never leaves a half-written checkpoint):

    OUTPUT_DIR/
      train_config.yaml        the full config of the run (all keys, defaults filled in)
      metrics.jsonl            one JSON object per line: {"kind": "train", "step", "epoch",
                               "lr", "loss", "loss_contrast", "loss_rtd", "rtd_acc",
                               "rtd_rep_acc", "rtd_fix_acc", "replaced_frac"} per step and
                               {"kind": "eval", "step", "stsb_dev", "best"} per evaluation
      summary.json             written at the end: steps, time, steps/s, dev before/best
      best/                    the model to export: the best STS-B dev step (or the last
                               step when no STS data was available)
        config.json            \
        model.safetensors       | encoder f as a plain Hugging Face folder (save_pretrained):
        tokenizer.json          | AutoModel / AutoTokenizer.from_pretrained(best) load it.
        tokenizer_config.json  /  Sentence vector = pooled last_hidden_state (before projector)
        modules.json, 1_Pooling/config.json, sentence_bert_config.json,
        config_sentence_transformers.json (+ 2_Normalize/ when the source ended in Normalize):
                               also a sentence-transformers folder with the trained pooling,
                               so SentenceTransformer(best) returns the same vector
                               (written by diffcse_train/st_files.py)
        projector.safetensors  projector weights (absent when projector is "none"), keys:
                                 batchnorm: linear1.weight            (2d, d)  no bias
                                            bn1.weight, bn1.bias      (2d,)
                                            bn1.running_mean, bn1.running_var (2d,)
                                            bn1.num_batches_tracked   ()  int64
                                            linear2.weight            (d, 2d)  no bias
                                            bn2.running_mean, bn2.running_var (d,)
                                            bn2.num_batches_tracked   ()  (bn2 is affine=False)
                                 tanh:      linear1.weight (d, d), linear1.bias (d,)
        diffcse_head.json      {"format": "diffcse-head", "version": 1,
                                "projector": "batchnorm" | "tanh" | "none",
                                "hidden_size": d, "pooling": "cls" | "mean",
                                "normalize": bool (the source ended in Normalize),
                                "batchnorm_eps": 1e-05 (batchnorm only)}
        train_config.yaml      the run's config
        metrics.json           {"step", "epoch", "stsb_dev", "initial_stsb_dev"}
        README.md              the model card (diffcse_train/card.py)
      last/                    what --resume needs (not for export)
        model.safetensors      every trainable tensor: encoder.*, projector.*,
                               discriminator.encoder.*, discriminator.head.* (G is reloaded)
        optimizer.pt           optimizer, scheduler, grad scaler, RNG states (each rank's
                               under DDP); read back with torch.load(weights_only=True)
        trainer_state.json     {"step", "epoch", "batch_in_epoch", "best_score", ...,
                                "world_size"}
        train_config.yaml

The discriminator and generator are not part of `best`: only f (and the projector, for
users who want the training-time head) is needed to embed sentences.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from diffcse_export.checkpoint_files import CONFIG_FILE, HEAD_FILE, METRICS_FILE, PROJECTOR_FILE
from diffcse_runtime.atomic import atomic_dir
from diffcse_runtime.errors import DiffcseError, first_line
from diffcse_runtime.remote_code import refuse_custom_code
from diffcse_train.card import CARD_FILE, best_card
from diffcse_train.config import TrainConfig
from diffcse_train.st_files import write_sentence_transformers_files

CHECKPOINT_TOOL = "diffcse-train"  # the tool best/'s and last/'s ownership manifests name
CHECKPOINT_WHAT = "a training checkpoint"


@dataclass
class TrainState:
    """Where training stands; with the RNG states this makes a resume exact."""

    step: int = 0
    epoch: int = 0
    batch_in_epoch: int = 0  # batches of `epoch` already consumed
    total_steps: int = 0
    best_score: float | None = None
    best_step: int | None = None
    initial_score: float | None = None
    initial_scores: dict[str, float] | None = None  # each eval task's score before training
    world_size: int = 1  # processes that wrote it; the global batch is batch_size x this


def _tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous().cpu() for k, v in state.items()}


class _Staging:
    """The staging folder of a checkpoint; `staging("name")` is the path of the file about
    to be written, remembered so that a failed write names it (a full disk raised
    SafetensorError, or torch's "unexpected pos", naming no file)."""

    def __init__(self, folder: Path, tmp: Path) -> None:
        self.folder, self.tmp, self.writing = folder, tmp, ""

    def __call__(self, name: str) -> Path:
        self.writing = name
        return self.tmp / name

    def failed(self, exc: Exception) -> DiffcseError:
        """One sentence: the file of the final folder, why, and the space left on its disk."""
        name, path = self.writing, Path(getattr(exc, "filename", None) or "")
        if path.is_relative_to(self.tmp):
            name = str(path.relative_to(self.tmp))
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else first_line(exc)
        free = shutil.disk_usage(self.tmp if self.tmp.exists() else self.folder.parent).free
        if free < 1e6 and not isinstance(exc, OSError):  # torch says "unexpected pos 165568"
            reason = "No space left on device"
        return DiffcseError(
            f"{self.folder / name}: could not be written ({reason}; {free / 1e6:.1f} MB free "
            "on its disk)"
        )


@contextlib.contextmanager
def _staged(folder: Path) -> Iterator[_Staging]:
    """A checkpoint folder staged and published whole (atomic_dir), write failures named."""
    with atomic_dir(folder, True, CHECKPOINT_TOOL, CHECKPOINT_WHAT) as tmp:
        staging = _Staging(folder, tmp)
        try:
            yield staging
        except (OSError, SafetensorError, RuntimeError) as exc:
            raise staging.failed(exc) from None


def save_best(folder: Path, model, tokenizer, cfg: TrainConfig, metrics: dict) -> None:
    """Write f as an HF folder plus projector, head description, config and metrics."""
    with _staged(folder) as staging:
        tmp = staging("model.safetensors").parent
        model.encoder.save_pretrained(tmp)  # safetensors by default
        staging("tokenizer.json")
        tokenizer.save_pretrained(tmp)
        staging("modules.json")
        write_sentence_transformers_files(tmp, model, tokenizer, cfg.model_name_or_path)
        head = {
            "format": "diffcse-head",
            "version": 1,
            "projector": cfg.projector,
            "hidden_size": int(model.encoder.config.hidden_size),
            "pooling": model.pooling,
            "normalize": bool(model.normalize),
        }
        if cfg.projector != "none":
            save_file(_tensors(model.projector.state_dict()), str(staging(PROJECTOR_FILE)))
        if cfg.projector == "batchnorm":
            head["batchnorm_eps"] = float(model.projector.bn1.eps)
        staging(HEAD_FILE).write_text(json.dumps(head, indent=2) + "\n", encoding="utf-8")
        staging(CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")
        staging(METRICS_FILE).write_text(json.dumps(metrics, indent=2) + "\n", encoding="utf-8")
        staging(CARD_FILE).write_text(best_card(cfg, head, metrics), encoding="utf-8")


def load_best(folder: str | Path):
    """Read a `best` folder back: (encoder, tokenizer, projector module, head dict)."""
    from transformers import AutoModel, AutoTokenizer

    from diffcse_train.model import build_projector

    folder = Path(folder)
    head_path = folder / HEAD_FILE
    if not head_path.is_file():
        raise DiffcseError(f"{folder}: no {HEAD_FILE}; not a diffcse-train checkpoint")
    head = json.loads(head_path.read_text(encoding="utf-8"))
    refuse_custom_code(folder)
    encoder = AutoModel.from_pretrained(str(folder), trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False)
    projector = build_projector(head["projector"], head["hidden_size"])
    if head["projector"] != "none":
        projector.load_state_dict(load_file(str(folder / PROJECTOR_FILE)))
    return encoder, tokenizer, projector, head


def save_last(
    folder: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    data_generator: torch.Generator,
    state: TrainState,
    cfg: TrainConfig,
    rank_rngs: list[dict] | None = None,
) -> None:
    """Write everything --resume needs to continue bit-for-bit.

    Under DDP (rank 0 writes) `rank_rngs` holds every rank's `rng_state`, in rank order.
    """
    extra = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": rank_rngs[0] if rank_rngs else rng_state(data_generator),
    }
    if rank_rngs and len(rank_rngs) > 1:
        extra["rng_ranks"] = rank_rngs
    with _staged(folder) as staging:
        save_file(_tensors(model.trainable_state_dict()), str(staging("model.safetensors")))
        torch.save(extra, staging("optimizer.pt"))
        staging("trainer_state.json").write_text(json.dumps(asdict(state), indent=2) + "\n")
        staging(CONFIG_FILE).write_text(cfg.to_yaml(), encoding="utf-8")


def rng_state(data_generator: torch.Generator) -> dict:
    """This process's random state: dropout (torch, CUDA) and the data edits' generator."""
    rng = {"torch": torch.get_rng_state(), "data": data_generator.get_state()}
    if torch.cuda.is_available():
        rng["cuda"] = torch.cuda.get_rng_state_all()
    return rng


def read_last_config(folder: Path) -> TrainConfig:
    import yaml

    from diffcse_train.config import from_dict

    path = folder / CONFIG_FILE
    if not path.is_file():
        raise DiffcseError(f"{folder}: no resumable checkpoint (missing {CONFIG_FILE})")
    return from_dict(yaml.safe_load(path.read_text(encoding="utf-8")), f"{path}: ")


def load_last(
    folder: Path,
    model,
    optimizer,
    scheduler,
    scaler,
    data_generator: torch.Generator,
    rank: int = 0,
) -> TrainState:
    """Restore model, optimizer, scheduler, scaler and RNG states; return the TrainState.

    Every rank of a DDP run loads the same folder and takes its own RNG state (`rank`).
    """
    try:
        weights = load_file(str(folder / "model.safetensors"))
        extra = torch.load(folder / "optimizer.pt", map_location="cpu", weights_only=True)
        state = TrainState(**json.loads((folder / "trainer_state.json").read_text()))
    except (FileNotFoundError, OSError, ValueError, TypeError) as exc:
        raise DiffcseError(f"{folder}: cannot read the resumable checkpoint ({exc})") from None
    result = model.load_state_dict(weights, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("generator.")]
    if missing or result.unexpected_keys:
        bad = (missing or result.unexpected_keys)[0]
        raise DiffcseError(f"{folder}: checkpoint does not match the configured model (key {bad})")
    optimizer.load_state_dict(extra["optimizer"])
    scheduler.load_state_dict(extra["scheduler"])
    if scaler is not None and extra.get("scaler"):
        scaler.load_state_dict(extra["scaler"])
    rng = extra["rng_ranks"][rank] if rank and "rng_ranks" in extra else extra["rng"]
    torch.set_rng_state(rng["torch"])
    data_generator.set_state(rng["data"])
    if "cuda" in rng and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(rng["cuda"])
    return state
