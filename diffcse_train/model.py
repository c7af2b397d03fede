"""The DiffCSE model in one file: encoder f, projector, frozen generator G, conditional
discriminator D; the losses they feed are in losses.py.

    sentence x --f (dropout view 1)--> pool --projector--> h1 \
               --f (dropout view 2)--> pool --projector--> h2  }-- contrastive loss (InfoNCE)
    x --edit (mask + G fills / replace / insert / delete)--> x'' --D, position 0 := h--> RTD loss
    loss = L_contrast + lambda_weight * L_RTD

Supervised SimCSE (`objective: supervised`, rows of sent0, sent1 and optional hard_neg):
sent0, sent1 and hard_neg are each encoded once (dropout on, as SimCSE does) through the
same pooling and projector, and sent0's h must pick its sent1 among every sent1 and
hard_neg of the batch. With lambda_weight > 0 it combines with RTD on sent0 alone: D,
conditioned on h(sent0), detects the edits of sent0, so h must also keep what tells sent0
from its edited copies (DiffCSE's equivariance) while the labelled pairs pull meaning
together. sent1 and hard_neg are not edited.

At test time only f is kept and the sentence vector is f's pooled state before the
projector. `pool` is [CLS] (the paper) or the masked mean over real tokens (what
sentence-transformers models such as all-MiniLM-L6-v2 were trained with); the pooling is
a property of the model (diffcse_runtime.pooling) and export puts the same one in the graph.

Three details follow the official code by default, each a config switch: G runs in train
mode (dropout on) under no_grad, so its argmax edits vary; the RTD loss averages over every
position, padding included as "kept"; the projector's Linear weights start from
N(0, initializer_range), as `init_weights()` leaves them in the official model.

D is a second full encoder (not a fork of transformers): a forward hook on D's embeddings
module overwrites position 0 of its output with h, i.e. after the embedding LayerNorm
(and dropout), exactly where the official code's `cls_input` goes. D is then called
normally, so transformers builds its own attention mask for any attention implementation.
The hook works for BERT, RoBERTa and every model whose encoder has an `embeddings` module.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn

from diffcse_runtime import builtin
from diffcse_runtime.errors import DiffcseError, first_line
from diffcse_runtime.pooling import read_source_pooling, resolve_pooling
from diffcse_runtime.remote_code import refuse_custom_code
from diffcse_train import distributed
from diffcse_train.config import TrainConfig
from diffcse_train.data import IGNORE
from diffcse_train.losses import contrastive_loss, rtd_loss, supervised_contrastive_loss

log = logging.getLogger("diffcse_train")


# ---------------------------------------------------------------- projector


class BatchNormProjector(nn.Module):
    """DiffCSE's head: Linear(d,2d) -> BN -> ReLU -> Linear(2d,d) -> BN(affine=False)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, 2 * dim, bias=False)
        self.bn1 = nn.BatchNorm1d(2 * dim)
        self.linear2 = nn.Linear(2 * dim, dim, bias=False)
        self.bn2 = nn.BatchNorm1d(dim, affine=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn2(self.linear2(F.relu(self.bn1(self.linear1(x)))))


class TanhProjector(nn.Module):
    """SimCSE's head: Linear(d,d) -> tanh (paper Table 5 ablation)."""

    def __init__(self, dim: int):
        super().__init__()
        self.linear1 = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tanh(self.linear1(x))


def build_projector(kind: str, dim: int) -> nn.Module:
    if kind == "batchnorm":
        return BatchNormProjector(dim)
    if kind == "tanh":
        return TanhProjector(dim)
    if kind == "none":
        return nn.Identity()
    raise ValueError(f"unknown projector {kind!r}")


# ---------------------------------------------------------------- losses


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """The sentence vector: [CLS] state, or the mean over real tokens (padding masked out).

    The mean matches sentence-transformers' Pooling(mean): sum of masked states over the
    token count clamped at 1e-9, so a model keeps the vector it was trained with.
    """
    if pooling == "cls":
        return hidden[:, 0]
    if pooling != "mean":
        raise ValueError(f"unknown pooling {pooling!r}")
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


# ---------------------------------------------------------------- discriminator


class ConditionalDiscriminator(nn.Module):
    """An encoder whose position-0 input embedding is the sentence vector h, plus a 2-way head."""

    def __init__(self, encoder: nn.Module):
        super().__init__()
        embeddings = getattr(encoder, "embeddings", None)
        if not isinstance(embeddings, nn.Module):
            raise DiffcseError(
                f"discriminator {type(encoder).__name__} has no `embeddings` module to condition on"
            )
        self.encoder = encoder
        self.head = nn.Linear(encoder.config.hidden_size, 2)
        self._condition: torch.Tensor | None = None
        embeddings.register_forward_hook(self._replace_position_0)

    def _replace_position_0(self, module, args, output):
        if self._condition is None:
            return output
        h = self._condition.to(output.dtype).unsqueeze(1)
        return torch.cat([h, output[:, 1:]], dim=1)

    def forward(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, condition: torch.Tensor
    ) -> torch.Tensor:
        """Token logits (n, len, 2) for `input_ids` conditioned on `condition` (n, d)."""
        self._condition = condition
        try:
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        finally:
            self._condition = None
        return self.head(hidden.last_hidden_state)


# ---------------------------------------------------------------- the model


class DiffCSE(nn.Module):
    """f + projector (+ D and G when lambda_weight > 0). `forward(batch)` returns the losses."""

    def __init__(
        self,
        encoder: nn.Module,
        projector: nn.Module,
        temperature: float = 0.05,
        lambda_weight: float = 0.0,
        discriminator: ConditionalDiscriminator | None = None,
        generator: nn.Module | None = None,
        condition_on: str = "projector",
        pooling: str = "cls",
        normalize: bool = False,
        generator_train_mode: bool = True,
        rtd_over_padding: bool = True,
    ):
        super().__init__()
        self.encoder = encoder
        self.projector = projector
        self.discriminator = discriminator
        self.generator = generator
        self.temperature = temperature
        self.lambda_weight = lambda_weight
        self.condition_on = condition_on
        self.pooling = pooling  # "cls" | "mean": the sentence vector, in training and after
        self.normalize = normalize  # the source ends in a Normalize module (kept on export)
        self.generator_train_mode = generator_train_mode
        self.rtd_over_padding = rtd_over_padding
        self.gather_negatives = False  # set by the trainer under DDP (config gather_negatives)
        if generator is not None:
            generator.requires_grad_(False)

    def train(self, mode: bool = True):
        super().train(mode)
        if self.generator is not None:  # frozen either way; dropout on only if asked
            self.generator.train(mode and self.generator_train_mode)
        return self

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Everything the checkpoint must hold: all but the frozen generator."""
        return {k: v for k, v in self.state_dict().items() if not k.startswith("generator.")}

    def sentence_views(self, input_ids, attention_mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode each sentence twice in one pass (dropout differs); return (pooled, h), 2B rows."""
        ids2, mask2 = input_ids.repeat(2, 1), attention_mask.repeat(2, 1)
        hidden = self.encoder(input_ids=ids2, attention_mask=mask2).last_hidden_state
        pooled = pool(hidden, mask2, self.pooling)
        return pooled, self.projector(pooled)

    @torch.no_grad()
    def edited_inputs(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """D's input ids, mask and labels; runs G (argmax) where the batch asks for a fill."""
        ids, mask = batch["aug_input_ids"], batch["aug_attention_mask"]
        if "aug_fill" in batch:
            if self.generator is None:
                raise DiffcseError("this augmentation needs a generator, but none is loaded")
            pred = self.generator(input_ids=ids, attention_mask=mask).logits.argmax(-1)
            ids = torch.where(batch["aug_fill"], pred, ids)
        labels = batch.get("aug_labels")
        if labels is None:  # mlm: replaced = G's token differs from the original token
            original = batch["input_ids"].repeat(len(ids) // len(batch["input_ids"]), 1)
            labels = (ids != original).long().masked_fill(~mask.bool(), IGNORE)
        return ids, mask, labels

    def views(self, batch: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """(pooled, h): two dropout views of each sentence (2B rows), or for a batch of
        triplets sent0, sent1 (and hard_neg) each encoded once (2B or 3B rows), one pass."""
        if "pair_input_ids" not in batch:
            return self.sentence_views(batch["input_ids"], batch["attention_mask"])
        ids = torch.cat([batch["input_ids"], batch["pair_input_ids"]])
        mask = torch.cat([batch["attention_mask"], batch["pair_attention_mask"]])
        hidden = self.encoder(input_ids=ids, attention_mask=mask).last_hidden_state
        pooled = pool(hidden, mask, self.pooling)
        return pooled, self.projector(pooled)

    def contrast(self, h: torch.Tensor, n: int, supervised: bool) -> torch.Tensor:
        """InfoNCE of the n anchors (h's first rows) against the other rows of h: the second
        views, or the positives then the hard negatives. Under DDP with gather_negatives
        the candidates of every rank's batch count (distributed.py)."""
        gather = distributed.gather_rows if self.gather_negatives else None
        if supervised:
            negative = h[2 * n :] if len(h) > 2 * n else None
            return supervised_contrastive_loss(
                h[:n], h[n : 2 * n], negative, self.temperature, gather
            )
        if gather is not None:
            z2, first = gather(h[n:])
            return contrastive_loss(h[:n], z2, self.temperature, first_label=first)
        return contrastive_loss(h[:n], h[n:], self.temperature)

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        n = batch["input_ids"].size(0)
        pooled, h = self.views(batch)
        loss_contrast = self.contrast(h, n, supervised="pair_input_ids" in batch)
        out = {"loss_contrast": loss_contrast.detach()}
        loss = loss_contrast
        if self.discriminator is not None and self.lambda_weight > 0:
            ids, mask, labels = self.edited_inputs(batch)
            # D sees the edits of each view (triplets: of sent0 alone), conditioned on its h
            condition = (h if self.condition_on == "projector" else pooled)[: len(ids)]
            logits = self.discriminator(ids, mask, condition)
            loss_rtd, stats = rtd_loss(logits, labels, self.rtd_over_padding)
            # under DDP: this rank's share of the mean over the global batch's positions
            counted = torch.ones_like(labels, dtype=torch.bool)
            share = distributed.token_share(counted if self.rtd_over_padding else labels != IGNORE)
            loss = loss + self.lambda_weight * loss_rtd * share
            out.update(loss_rtd=loss_rtd.detach(), **stats)
        out["loss"] = loss
        return out

    def discriminator_loss(self, batch: dict) -> dict[str, torch.Tensor]:
        """D alone on G's edits, conditioned on h with no gradient into f: D's warm start
        (`discriminator_warmup_steps`), so that its gradient into h means something from
        the first joint step."""
        with torch.no_grad():
            pooled, h = self.views(batch)
        ids, mask, labels = self.edited_inputs(batch)
        condition = (h if self.condition_on == "projector" else pooled)[: len(ids)]
        logits = self.discriminator(ids, mask, condition)
        loss, stats = rtd_loss(logits, labels, self.rtd_over_padding)
        return {"loss": loss, "loss_rtd": loss.detach(), **stats}


# ---------------------------------------------------------------- loading


def _local_or_hub(spec: str, key: str) -> Path:
    """Resolve builtin: names; a path-like value that does not exist fails here, not on the Hub."""
    path = builtin.model_path(spec)
    looks_local = str(spec).startswith(("/", ".", "~")) or Path(spec).suffix in (".yaml", ".txt")
    if looks_local and not path.exists():
        raise DiffcseError(f"{key} {spec}: no such folder")
    refuse_custom_code(path, key)
    return path


def _load(kind: str, spec: str, key: str):
    """from_pretrained with errors a user can act on; returns (model, loading info)."""
    from transformers import AutoModel, AutoModelForMaskedLM

    path = _local_or_hub(spec, key)
    cls = AutoModelForMaskedLM if kind == "mlm" else AutoModel
    try:
        return cls.from_pretrained(str(path), output_loading_info=True, trust_remote_code=False)
    except pickle.UnpicklingError:
        raise DiffcseError(
            f"{key} {spec}: its .bin weights hold pickled objects other than tensors, which "
            "are not loaded because unpickling can run code; save the model as safetensors"
        ) from None
    except SafetensorError as exc:
        raise DiffcseError(
            f"{key} {spec}: a .safetensors weight file is corrupt or truncated ({exc})"
        ) from None
    except (OSError, ValueError, KeyError, RuntimeError, EOFError) as exc:
        first = first_line(exc)
        raise DiffcseError(f"{key} {spec}: cannot load a Hugging Face model ({first})") from None


def load_tokenizer(spec: str, key: str = "model_name_or_path"):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(_local_or_hub(spec, key)), trust_remote_code=False)
    except Exception as exc:  # tokenizers' Rust errors are plain Exception, no narrower type
        first = first_line(exc)
        raise DiffcseError(f"{key} {spec}: cannot load its tokenizer ({first})") from None


def _freeze_pooler(model: nn.Module) -> None:
    """The HF pooler is unused ([CLS] before it is the embedding): keep it, but frozen."""
    pooler = getattr(model, "pooler", None)
    if isinstance(pooler, nn.Module):
        pooler.requires_grad_(False)


def _warn_missing(info: dict, key: str, spec: str) -> None:
    missing = [k for k in info.get("missing_keys", ()) if "pooler" not in k]
    if missing:
        log.warning(
            "%s %s: %d weights were not in the checkpoint and are randomly initialised (e.g. %s)",
            key, spec, len(missing), sorted(missing)[0],
        )  # fmt: skip


def check_same_vocabulary(tok_f, tok_g, model_spec: str, gen_spec: str) -> None:
    """G must produce f's token ids: refuse a generator with another vocabulary."""
    vocab_f, vocab_g = tok_f.get_vocab(), tok_g.get_vocab()
    if vocab_f == vocab_g:
        return
    differing = next((t for t, i in vocab_f.items() if vocab_g.get(t) != i), None)
    detail = f"e.g. token {differing!r} has id {vocab_f.get(differing)} vs {vocab_g.get(differing)}"
    raise DiffcseError(
        f"generator {gen_spec} uses another vocabulary than the encoder {model_spec} "
        f"({len(vocab_g)} vs {len(vocab_f)} tokens; {detail}); "
        "DiffCSE needs a generator that shares the encoder's tokenizer"
    )


def verify_pretrained_weights(model: nn.Module, info: dict, spec: str) -> int:
    """Refuse a generator whose weights are not all the checkpoint's (silent re-init trap).

    Checks the loading report and then compares every tensor stored in the folder's
    safetensors files with the loaded parameter of the same name. Returns the count compared.
    """
    missing = sorted(info.get("missing_keys", ()))
    if missing:
        raise DiffcseError(
            f"generator {spec}: the checkpoint has no weights for {len(missing)} parameters "
            f"(e.g. {missing[0]}); they would be random, so it is not a trained masked LM"
        )
    from safetensors import safe_open

    folder = builtin.model_path(spec)
    state = model.state_dict()
    compared = 0
    for file in sorted(Path(folder).glob("*.safetensors")) if Path(folder).is_dir() else []:
        with safe_open(str(file), framework="pt") as fh:
            for name in fh.keys():  # noqa: SIM118 - safe_open is not a dict
                if name not in state:
                    continue
                stored = fh.get_tensor(name)
                if not torch.equal(state[name].to(stored.dtype).cpu(), stored):
                    raise DiffcseError(
                        f"generator {spec}: loaded weight {name} differs from the checkpoint file; "
                        "the model was re-initialised after loading"
                    )
                compared += 1
    return compared


def model_pooling(cfg: TrainConfig) -> tuple[str, bool]:
    """(pooling, normalize) for f: `auto` takes the source's own; a switch is said out loud.

    A source whose sentence-transformers files declare a pooling keeps it under `auto`; an
    explicit `cls`/`mean` that differs from it is honoured (the user asked) with a warning,
    because the model's vector then changes meaning.
    """
    folder = builtin.model_path(cfg.model_name_or_path)
    source = read_source_pooling(folder) if folder.is_dir() else None
    pooling = resolve_pooling(cfg.pooling, folder) if folder.is_dir() else cfg.pooling
    if pooling == "auto":  # a hub id we cannot read files of: the paper's protocol
        pooling = "cls"
    if source is not None and cfg.pooling != "auto" and pooling != source.pooling:
        log.warning(
            "pooling %s was requested, but %s declares %s pooling: training a %s-pooled model "
            "from it (set pooling: auto to keep the source's own)",
            pooling, source.declared_in, source.pooling, pooling,
        )  # fmt: skip
    normalize = bool(source and source.normalize and pooling == source.pooling)
    return pooling, normalize


def init_projector(projector: nn.Module, std: float) -> None:
    """N(0, std) Linear weights and zero biases, as the official model's init_weights() gives."""
    for module in projector.modules():
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=std)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def build_model(cfg: TrainConfig):
    """Load f, the projector, and (when lambda_weight > 0) D and G; returns (model, tokenizer)."""
    tokenizer = load_tokenizer(cfg.model_name_or_path)
    encoder, info = _load("encoder", cfg.model_name_or_path, "model_name_or_path")
    _warn_missing(info, "model_name_or_path", cfg.model_name_or_path)
    _freeze_pooler(encoder)
    dim = encoder.config.hidden_size
    pooling, normalize = model_pooling(cfg)
    log.info("pooling: %s (config %s)", pooling, cfg.pooling)
    projector = build_projector(cfg.projector, dim)
    if cfg.projector_init == "normal":
        init_projector(projector, float(getattr(encoder.config, "initializer_range", 0.02)))

    discriminator = generator = None
    if cfg.uses_discriminator:
        d_spec = cfg.discriminator_name_or_path or cfg.model_name_or_path
        d_encoder, d_info = _load("encoder", d_spec, "discriminator_name_or_path")
        _warn_missing(d_info, "discriminator_name_or_path", d_spec)
        _freeze_pooler(d_encoder)
        if d_encoder.config.hidden_size != dim:
            raise DiffcseError(
                f"discriminator {d_spec} has hidden size {d_encoder.config.hidden_size}, "
                f"the encoder {dim}: D is conditioned on the encoder's sentence vector"
            )
        discriminator = ConditionalDiscriminator(d_encoder)
    if cfg.needs_generator:
        g_spec = cfg.generator_name_or_path
        check_same_vocabulary(
            tokenizer,
            load_tokenizer(g_spec, "generator_name_or_path"),
            cfg.model_name_or_path,
            g_spec,
        )
        generator, g_info = _load("mlm", g_spec, "generator_name_or_path")
        n = verify_pretrained_weights(generator, g_info, g_spec)
        log.info("generator %s: %d tensors verified against its checkpoint", g_spec, n)
    model = DiffCSE(
        encoder,
        projector,
        temperature=cfg.temperature,
        lambda_weight=cfg.lambda_weight,
        discriminator=discriminator,
        generator=generator,
        condition_on=cfg.condition_on,
        pooling=pooling,
        normalize=normalize,
        generator_train_mode=cfg.generator_train_mode,
        rtd_over_padding=cfg.rtd_loss_over_padding,
    )
    return model, tokenizer


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad)
