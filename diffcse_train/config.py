"""TrainConfig: every training hyperparameter, read from YAML plus `--set key=value` overrides.

The defaults below are the one source of truth for what an unset key means; the paper's
values live in configs/*.yaml. Reading is strict: an unknown key, a value of the wrong type
or out of range is a `ConfigError` naming the key (and the file), never a silent default.

Paths in the config are used as given, so relative ones are relative to the directory the
command runs in. `model_name_or_path`, `generator_name_or_path` and
`discriminator_name_or_path` accept `builtin:all-MiniLM-L6-v2`; `train_file` accepts
`builtin:wiki_en` (see diffcse_runtime.builtin).
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from diffcse_export.checkpoint_files import PROJECTORS
from diffcse_runtime.bounds import bounded, check_bounds
from diffcse_runtime.errors import DiffcseError
from diffcse_runtime.pooling import POOLINGS
from diffcse_runtime.sts import tasks_with_split

AUGMENTATIONS = ("mlm", "replace", "insert", "delete", "none")
OBJECTIVES = ("auto", "unsupervised", "supervised")
GENERATOR_AUGMENTATIONS = ("mlm", "insert")
POOLING_CHOICES = ("auto", *POOLINGS)
PROJECTOR_INITS = ("normal", "pytorch")
CONDITIONS = ("projector", "encoder")
PRECISIONS = ("fp32", "fp16", "bf16")
DEVICES = ("auto", "cpu", "cuda")
ENCODING_ERRORS = ("strict", "replace")
REPORT_TO = ("none", "tensorboard")
# Keys that may change between a killed run and its --resume without changing the math.
RESUME_FREE_KEYS = (
    "eval_data_dir", "save_steps", "output_dir", "export_dir", "export_variants",
    "report", "report_to", "compare_with",
)  # fmt: skip
# Keys earlier versions had. Their saved configs (train_config.yaml, every key written) list
# them as null, which is dropped so those runs still resume; any other value is refused.
RETIRED_KEYS = {
    "crash_at_step": "was a test hook (the process killed itself after that step) and is gone",
}


# Gradient accumulation is refused with a reason instead of an unknown-key error.
ACCUMULATION_KEYS = ("gradient_accumulation_steps", "accumulation_steps", "grad_accum_steps")
NO_ACCUMULATION = (
    "gradient accumulation is not supported: the contrastive loss uses in-batch negatives, "
    "so k accumulated batches of B sentences are not one batch of k*B (each sentence would "
    "see B-1 negatives, not k*B-1); raise batch_size or train on more GPUs with torchrun"
)


class ConfigError(DiffcseError):
    """A training config names an unknown key or holds a bad value."""


@dataclass
class TrainConfig:
    """DiffCSE training settings; defaults are the paper's BERT-base STS setting (Table 12)."""

    # --- models
    model_name_or_path: str = ""  # encoder f (any AutoModel encoder), required
    generator_name_or_path: str | None = None  # frozen masked LM G (mlm / insert augmentation)
    # true: when generator_name_or_path is not a folder yet, first fit an MLM head on the
    # frozen f over train_file and save it there (diffcse-train fit-generator's defaults)
    fit_generator: bool = False
    discriminator_name_or_path: str | None = None  # D's initial weights; null = same as f
    # --- data
    train_file: str = ""  # one sentence per line (UTF-8), or builtin:wiki_en; required
    encoding_errors: str = "strict"  # "replace" decodes bad UTF-8 bytes as U+FFFD
    max_seq_length: int = bounded(32, ge=1)
    # --- objective
    # unsupervised: train_file is sentences (SimCSE/DiffCSE); supervised: rows of sent0,
    # sent1 and optional hard_neg (supervised SimCSE, diffcse_train/triplets.py); auto:
    # supervised when train_file is a .csv/.tsv/.jsonl naming sent0 and sent1
    objective: str = "auto"
    # weight of the replaced-token-detection loss; 0 = SimCSE
    lambda_weight: float = bounded(0.005, ge=0)
    # fraction of non-special tokens edited per sentence
    mask_ratio: float = bounded(0.30, gt=0, lt=1)
    # cosines lie in [-1, 1]: above 1 the logits span less than 2 and the loss barely moves
    temperature: float = bounded(0.05, gt=0, le=1)
    augmentation: str = "mlm"  # mlm | replace | insert | delete | none
    projector: str = "batchnorm"  # batchnorm | tanh | none
    # the sentence vector f gives: cls (the paper) | mean (masked mean over real tokens) |
    # auto (the source model's own, from its sentence-transformers files; else cls). It is
    # what the projector, the loss, D's condition, the dev score, export and the runtime use.
    pooling: str = "auto"
    condition_on: str = "projector"  # D is conditioned on the projector output or the pooled f
    projector_init: str = "normal"  # normal: N(0, initializer_range) as the official code; pytorch
    # the official code's details (each measured in benchmarks/notes/quality-and-training.md):
    generator_train_mode: bool = True  # G's dropout on while training (still frozen, no grad)
    rtd_loss_over_padding: bool = True  # RTD loss averages over padding too, as label "kept"
    gather_negatives: bool = True  # under torchrun: every rank's sentences are negatives
    # levers for the RTD term on short budgets (each off by default; measured in
    # benchmarks/README.md "Making RTD pull its weight"):
    # D's (and its head's) own peak learning rate; null = learning_rate. With AdamW, lambda
    # scales D's gradients but barely its steps, so D learns at this rate whatever lambda is
    discriminator_learning_rate: float | None = bounded(None, gt=0, le=1)
    # before the joint steps, this many steps train D alone (f frozen, h detached) on G's
    # edits, so D's gradient into h carries signal from the first joint step
    discriminator_warmup_steps: int = bounded(0, ge=0)
    # lambda rises linearly from 0 to lambda_weight over the first N joint steps
    lambda_warmup_steps: int = bounded(0, ge=0)
    # --- optimisation
    # per process (>= 2: in-batch negatives); under torchrun the global batch is
    # batch_size x WORLD_SIZE
    batch_size: int = bounded(64, ge=2)
    learning_rate: float = bounded(7e-6, gt=0, le=1)
    weight_decay: float = bounded(0.0, ge=0, le=1)  # AdamW's decoupled decay
    warmup_steps: int = bounded(0, ge=0)
    max_grad_norm: float = bounded(1.0, ge=0)  # 0 disables clipping
    epochs: int = bounded(2, ge=1)
    # stop (and end the linear decay) after this many steps
    max_steps: int | None = bounded(None, ge=1)
    precision: str = "fp32"  # fp32 | fp16 | bf16 (autocast)
    device: str = "auto"  # auto | cpu | cuda
    seed: int = bounded(42, ge=0, lt=2**32)
    # --- evaluation and checkpoints
    eval_data_dir: str | None = None  # SentEval-layout STS data; STS-B dev picks the best step
    eval_steps: int = bounded(125, ge=1)
    eval_fp32: bool = True  # score STS-B dev in fp32 even when training under autocast
    # dev tasks scored at each evaluation; the best step maximises their mean Spearman.
    # STSBenchmark alone is the official protocol; adding SICKRelatedness (its trial split)
    # guards against a model that only learns STS-B dev
    eval_tasks: str = "STSBenchmark"
    # the eval tasks whose mean picks best/ (comma-separated); empty = all of eval_tasks.
    # The paper selects on STSBenchmark alone and reports the others as second opinions
    select_on: str = ""
    # the input model (step 0) competes for best/: a run that never beats it ships it as is
    keep_initial: bool = False
    # with keep_initial: a step replaces the input model only if it beats it on EVERY eval
    # task (then the best mean decides), so best/ is never worse than the input on any of them
    gain_on_every_task: bool = False
    save_steps: int = bounded(125, ge=1)  # how often the resumable `last` checkpoint is written
    output_dir: str = ""  # required
    # --- after training (diffcse_train/release.py)
    # export best/ here (fp32) and beside it (OUT-int8, ...), then print the before/after
    # table (input model vs trained, STS-B dev and SICK-R trial, through the runtime)
    export_dir: str | None = None
    export_variants: str = "int8"  # comma-separated extra variants: optimized, int8, fp16
    # simcse: also train the SimCSE twin (lambda_weight 0, no augmentation, same everything
    # else) in OUTPUT_DIR-simcse and ship whichever scores higher at selection (compare.py)
    compare_with: str = "none"
    # --- the run's report (diffcse_train/report.py)
    # report.png + report.json in output_dir: dev curves, losses, D, STS-B dev geometry
    report: bool = True
    # none | tensorboard: the same scalars as event files under output_dir/tensorboard/
    report_to: str = "none"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        import yaml

        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def needs_generator(self) -> bool:
        return self.lambda_weight > 0 and self.augmentation in GENERATOR_AUGMENTATIONS

    @property
    def uses_discriminator(self) -> bool:
        return self.lambda_weight > 0

    @property
    def select_tasks(self) -> list[str]:
        """The eval tasks whose mean Spearman picks best/ (`select_on`, else all of them)."""
        chosen = self.select_on or self.eval_tasks
        return [t.strip() for t in chosen.split(",") if t.strip()]


def objective_name(cfg: TrainConfig, objective: str) -> str:
    """What the main job's table and best/'s model card call the objective `cfg` trains;
    `objective` is the resolved one (`objective: auto` becomes supervised for a sent0/sent1
    file: TrainSummary.objective, best/metrics.json's "objective"). Here, below compare.py
    and card.py, so both name a run with this one function (card.py sits under run_dir.py,
    which compare.py imports)."""
    supervised = objective == "supervised"
    if cfg.uses_discriminator:
        return f"{'supervised ' if supervised else ''}DiffCSE-{cfg.augmentation}"
    return "supervised SimCSE" if supervised else "SimCSE"


FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}


def _allowed_types(name: str) -> tuple[type, ...]:
    hint = typing.get_type_hints(TrainConfig)[name]
    if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union:
        return tuple(typing.get_args(hint))
    return (hint,)


def _coerce(name: str, value: Any, where: str) -> Any:
    """Check `value` against the field's type; numbers written as strings ("7e-6") are read."""
    allowed = _allowed_types(name)
    if value is None:
        if type(None) in allowed:
            return None
        raise ConfigError(f"{where}key {name!r} must be set (got null)")
    if bool in allowed:
        if isinstance(value, bool):
            return value
    elif int in allowed:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
    elif float in allowed:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
    elif str in allowed and isinstance(value, str | int | float) and not isinstance(value, bool):
        return str(value)
    kind = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}
    want = " or ".join(kind[t] for t in allowed if t in kind)
    raise ConfigError(f"{where}key {name!r} must be {want}, got {value!r}")


def _check_choice(cfg: TrainConfig, name: str, choices: tuple[str, ...], where: str) -> None:
    value = getattr(cfg, name)
    if value not in choices:
        raise ConfigError(f"{where}key {name!r} must be one of {', '.join(choices)}; got {value!r}")


def validate(cfg: TrainConfig, where: str = "") -> TrainConfig:
    """Range and consistency checks; `where` prefixes messages (e.g. the config file).

    Every numeric key's range is declared beside the key (`bounded`) and checked first, so
    NaN, infinities and out-of-range values never reach the consistency checks below (NaN
    compares false with everything: `lambda_weight: nan` would read as "no D").
    """
    try:
        check_bounds(cfg, lambda name: f"{where}key {name!r}")
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    for key in ("model_name_or_path", "train_file", "output_dir"):
        if not getattr(cfg, key):
            raise ConfigError(f"{where}key {key!r} is required")
    _check_choice(cfg, "objective", OBJECTIVES, where)
    _check_choice(cfg, "augmentation", AUGMENTATIONS, where)
    _check_choice(cfg, "projector", PROJECTORS, where)
    _check_choice(cfg, "pooling", POOLING_CHOICES, where)
    _check_choice(cfg, "projector_init", PROJECTOR_INITS, where)
    dev_tasks = tasks_with_split("dev")
    for task in cfg.eval_tasks.split(","):
        if task.strip() not in dev_tasks:
            raise ConfigError(
                f"{where}key 'eval_tasks': {task.strip()!r} has no dev split; use "
                f"{' and/or '.join(dev_tasks)} (comma-separated)"
            )
    chosen = [t.strip() for t in cfg.eval_tasks.split(",")]
    for task in cfg.select_tasks:
        if task not in chosen:
            raise ConfigError(
                f"{where}key 'select_on': {task!r} is not one of eval_tasks ({cfg.eval_tasks})"
            )
    _check_choice(cfg, "condition_on", CONDITIONS, where)
    _check_choice(cfg, "compare_with", ("none", "simcse"), where)
    _check_choice(cfg, "precision", PRECISIONS, where)
    _check_choice(cfg, "device", DEVICES, where)
    _check_choice(cfg, "encoding_errors", ENCODING_ERRORS, where)
    _check_choice(cfg, "report_to", REPORT_TO, where)
    if cfg.lambda_weight > 0 and cfg.augmentation == "none":
        raise ConfigError(
            f"{where}lambda_weight > 0 needs an augmentation for the discriminator "
            "(mlm, replace, insert or delete); set lambda_weight: 0 for plain SimCSE"
        )
    if cfg.needs_generator and not cfg.generator_name_or_path:
        raise ConfigError(
            f"{where}augmentation {cfg.augmentation!r} needs generator_name_or_path "
            "(a masked LM with the encoder's vocabulary); 'replace' and 'delete' need none"
        )
    if cfg.gain_on_every_task and not cfg.keep_initial:
        raise ConfigError(
            f"{where}gain_on_every_task: true needs keep_initial: true (the input model is "
            "what every task must beat, and it is best/ until a step does)"
        )
    builtin_generator = (cfg.generator_name_or_path or "").startswith("builtin:")
    if cfg.fit_generator and cfg.needs_generator and builtin_generator:
        raise ConfigError(
            f"{where}fit_generator: true needs generator_name_or_path to be a folder to "
            f"write, not {cfg.generator_name_or_path!r}"
        )
    return cfg


def _unknown_key(key: str, where: str) -> ConfigError:
    if key in ACCUMULATION_KEYS:
        return ConfigError(f"{where}key {key!r}: {NO_ACCUMULATION}")
    close = difflib.get_close_matches(key, FIELDS, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return ConfigError(f"{where}unknown key {key!r}{hint}")


def from_dict(data: dict[str, Any], where: str = "") -> TrainConfig:
    """Build a config from a mapping, rejecting unknown keys and badly typed values."""
    values = {}
    for key, value in data.items():
        if key in RETIRED_KEYS and value is None:
            continue
        if key in RETIRED_KEYS:
            raise ConfigError(f"{where}key {key!r} {RETIRED_KEYS[key]}; remove it")
        if key not in FIELDS:
            raise _unknown_key(str(key), where)
        values[key] = _coerce(key, value, where)
    return TrainConfig(**values)


def parse_override(text: str) -> tuple[str, Any]:
    """`key=value` with the value read as YAML (so 1e-5, true, null work)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key not in FIELDS:
        raise _unknown_key(key, "--set: ")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, _coerce(key, value, "--set: ")


def load_config(
    path: str | Path | None, overrides: list[str] | tuple[str, ...] = ()
) -> TrainConfig:
    """Read a YAML (or JSON) config file, apply `key=value` overrides, validate."""
    import yaml

    data: dict[str, Any] = {}
    where = ""
    if path is not None:
        path = Path(path)
        where = f"{path}: "
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"{path}: config file not found") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{path}: not valid UTF-8") from None
        try:
            loaded = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
        except (yaml.YAMLError, json.JSONDecodeError) as exc:
            raise ConfigError(f"{path}: not valid YAML/JSON ({exc})".replace("\n", " ")) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping of key: value at the top level")
        data.update(loaded)
    cfg = from_dict(data, where)
    for text in overrides:
        key, value = parse_override(text)
        setattr(cfg, key, value)
    return validate(cfg, where)


def resume_mismatch(saved: TrainConfig, current: TrainConfig) -> str | None:
    """The first key (other than RESUME_FREE_KEYS) whose value differs, described; else None."""
    for key in FIELDS:
        if key in RESUME_FREE_KEYS:
            continue
        old, new = getattr(saved, key), getattr(current, key)
        if old != new:
            return f"key {key!r} is {new!r} now but {old!r} in the checkpoint"
    return None
