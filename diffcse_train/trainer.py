"""The training loop: AdamW + linear decay, AMP, STS-B dev every `eval_steps`, best/last
checkpoints, exact resume, a metrics JSONL log, a progress bar, and a stop on NaN.

Under torchrun the same loop runs on every process (see distributed.py): the model is
wrapped in DDP, each rank trains on its block of the global batch, and rank 0 alone
evaluates, writes checkpoints and logs while the others wait.

Reproducibility: with the same config and seed, a CPU run gives the same loss curve every
time. Three things carry all randomness: the batch order (a function of seed and epoch,
see data.epoch_order), the collator's torch.Generator (the edits), and torch's global RNG
(dropout). `last/` stores the latter two and the position in the data, so a run killed at
any point and resumed with `--resume` ends in the same state as one that never stopped.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from diffcse_runtime import sts
from diffcse_runtime.errors import DiffcseError
from diffcse_train import checkpoint, distributed
from diffcse_train.checkpoint import TrainState
from diffcse_train.config import TrainConfig, objective_name, validate
from diffcse_train.data import Collator, epoch_order
from diffcse_train.evaluation import TASK_KEYS, find_eval_data, make_encode_fn, present_eval_tasks
from diffcse_train.generator import ensure_generator
from diffcse_train.model import build_model, count_parameters
from diffcse_train.optim import linear_schedule, make_optimizer
from diffcse_train.precision import autocast, autocast_dtype
from diffcse_train.preflight import RunSetup, prepare_run
from diffcse_train.report import RecordingEncode, RunReport, check_available
from diffcse_train.run_dir import jsonable

log = logging.getLogger("diffcse_train")


class TrainingDiverged(DiffcseError):
    """The loss became NaN or infinite."""


@dataclass
class TrainSummary:
    steps: int
    seconds: float  # wall time of this session, evaluations and checkpoints included
    steps_per_second: float  # training steps only (batching, forward, backward, update)
    initial_score: float | None  # STS-B dev Spearman x100 before training
    best_score: float | None
    best_step: int | None
    final_loss: float | None
    output_dir: str
    report: str | None = None  # report.png, when drawn
    objective: str = "unsupervised"  # as resolved from train_file (objective: auto)


def _size(module: torch.nn.Module) -> str:
    n = count_parameters(module)
    return f"{n / 1e6:.1f}M trainable" if n >= 1e6 else f"{n:,} trainable"


class Trainer:
    """One training run of `cfg`; `run()` trains, evaluates, checkpoints, returns a summary."""

    def __init__(
        self,
        cfg: TrainConfig,
        resume: bool = False,
        overwrite: bool = False,
        setup: RunSetup | None = None,
    ):
        """Build the model, optimizer and data of `cfg`; `run()` trains. `setup` holds what
        train() checked first; a Trainer built directly (a benchmark, a test) checks it
        here. The generator must exist: train() fits a missing one before this."""
        self.cfg = cfg
        self.resume = resume
        setup = setup or prepare_run(cfg, resume, overwrite)
        self.run_dir, self.device, self.sentences = setup.run_dir, setup.device, setup.sentences
        self.objective = setup.objective  # unsupervised: sentences; supervised: triplets
        self.out, self.best_dir, self.last_dir = (
            self.run_dir.out,
            self.run_dir.best,
            self.run_dir.last,
        )
        self.steps_per_epoch, self.total_steps = setup.steps_per_epoch, setup.total_steps
        world = distributed.world_size()
        self.dtype = autocast_dtype(cfg.precision, self.device)
        torch.manual_seed(cfg.seed)
        self.model, self.tokenizer = build_model(cfg)
        self.model.to(self.device)
        self.model.gather_negatives = cfg.gather_negatives and world > 1
        self.train_model = distributed.wrap_model(self.model, self.device)  # DDP under torchrun
        distributed.seed_per_rank(cfg.seed)
        seed = cfg.seed + 1 + distributed.rank()
        self.collator = Collator(
            self.tokenizer, cfg.max_seq_length, self._augmentation(), cfg.mask_ratio, seed
        )
        self.optimizer = make_optimizer(self.model, cfg)
        self.scheduler = linear_schedule(self.optimizer, cfg.warmup_steps, self.total_steps)
        use_scaler = self.dtype == torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if use_scaler else None
        self.state = TrainState(total_steps=self.total_steps, world_size=world)
        eval_dtype = None if cfg.eval_fp32 else self.dtype
        self.encode = RecordingEncode(  # the report reuses the dev vectors it computes
            make_encode_fn(self.model, self.tokenizer, self.device, eval_dtype)
        )
        self.eval_dir = find_eval_data(cfg.eval_data_dir)
        self.eval_tasks = present_eval_tasks(cfg.eval_tasks, self.eval_dir)
        main = distributed.is_main()
        self.report = RunReport(cfg, self.out, self.eval_dir, self.encode, resume, main)
        self.dev_scores: dict[str, float] = {}
        self._last_dev: float | None = None  # shown in the progress bar
        self._order: tuple[int, torch.Tensor] | None = None  # (epoch, its seeded order)
        if not resume:  # only now that the new run could be set up, replace the old one
            distributed.main_only(self.run_dir.start, cfg, setup.replaced)

    # ------------------------------------------------------------ setup

    def _augmentation(self) -> str:
        return self.cfg.augmentation if self.cfg.uses_discriminator else "none"

    # ------------------------------------------------------------ logging

    def _write_metrics(self, record: dict) -> None:
        if distributed.is_main():
            self.run_dir.append_metrics(record)
            self.report.on_metrics(record)  # TensorBoard; the geometry after an eval

    # ------------------------------------------------------------ evaluation and saving

    def evaluate(self) -> float | None:
        """The selection score: the mean dev Spearman x100 over the `select_on` tasks (STS-B
        dev alone by default), through the runtime's evaluator; None without data. Every
        eval task's score is kept in `self.dev_scores` for the log and the report."""
        if self.eval_dir is None:
            return None
        result = sts.evaluate(self.encode, self.eval_dir, tasks=self.eval_tasks, split="dev")
        self.dev_scores = {TASK_KEYS[t]: result.scores[t].spearman for t in self.eval_tasks}
        chosen = [TASK_KEYS[t] for t in self.eval_tasks if t in self.cfg.select_tasks]
        chosen = chosen or list(self.dev_scores)  # the selection tasks' data is missing
        return sum(self.dev_scores[k] for k in chosen) / len(chosen)

    def _describe_scores(self, score: float) -> str:
        if len(self.dev_scores) == 1:
            return f"STS-B dev {score:.2f}"
        parts = ", ".join(f"{k} {v:.2f}" for k, v in self.dev_scores.items())
        return f"selection score {score:.2f} ({parts})"

    def _best_metrics(self, score: float | None) -> dict:
        s = self.state
        return {
            "step": s.step,
            "epoch": self._epoch(),
            "stsb_dev": score,
            "initial_stsb_dev": s.initial_score,
            **self.dev_scores,  # each eval task's score (stsb_dev again when it is the only one)
            "dev_score": score,
            "eval_tasks": self.eval_tasks,
            "objective": self.objective,
        }

    def _evaluate_and_keep_best(self) -> float | None:
        score = self._last_dev = self.evaluate()
        if score is None:
            return None
        s = self.state
        eligible = self._beats_input_on_every_task()
        improved = eligible and (s.best_score is None or score > s.best_score)
        if improved:
            s.best_score, s.best_step = score, s.step
            checkpoint.save_best(
                self.best_dir, self.model, self.tokenizer, self.cfg, self._best_metrics(score)
            )
        record = {"kind": "eval", "step": s.step, **self.dev_scores, "dev_score": score}
        self._write_metrics({**record, "best": improved, "eligible": eligible})
        described = self._describe_scores(score)
        note = " (best so far)" if improved else ""
        if not eligible:
            note = " (not above the input model on every dev task)"
        log.info("step %d: %s%s", s.step, described, note)
        return score

    def _beats_input_on_every_task(self) -> bool:
        """gain_on_every_task: only a step above the input model on each dev task may ship."""
        initial = self.state.initial_scores
        if not self.cfg.gain_on_every_task or not initial:
            return True
        return all(self.dev_scores[k] > initial[k] for k in initial)

    def _main_only(self, fn: Callable[[], object]) -> None:
        """Run `fn` (evaluation, saving) on rank 0 while the others wait; then every rank
        holds rank 0's scores."""

        def run_and_share() -> tuple:
            fn()
            s = self.state
            return s.best_score, s.best_step, s.initial_score, self._last_dev

        s = self.state
        s.best_score, s.best_step, s.initial_score, self._last_dev = distributed.main_only(
            run_and_share
        )

    def _save_last(self) -> None:
        # every rank's RNG state (a collective, so on all ranks), then rank 0 writes
        rngs = distributed.gather_objects(checkpoint.rng_state(self.collator.generator))
        self._main_only(lambda: self._write_last(rngs))

    def _write_last(self, rngs: list[dict]) -> None:
        checkpoint.save_last(
            self.last_dir,
            self.model,
            self.optimizer,
            self.scheduler,
            self.scaler,
            self.collator.generator,
            self.state,
            self.cfg,
            rank_rngs=rngs,
        )
        if self.eval_dir is None:  # without a dev set the latest step is the one we keep
            checkpoint.save_best(
                self.best_dir, self.model, self.tokenizer, self.cfg, self._best_metrics(None)
            )

    # ------------------------------------------------------------ training

    def _lambda_now(self) -> float:
        """lambda_weight, ramped linearly from 0 over the first `lambda_warmup_steps`."""
        ramp = self.cfg.lambda_warmup_steps
        factor = min(1.0, (self.state.step + 1) / ramp) if ramp else 1.0
        return self.cfg.lambda_weight * factor

    def _warm_start_discriminator(self) -> None:
        """`discriminator_warmup_steps` steps of D alone (f frozen) on G's edits, before the
        joint steps, on batches from the end of the first epoch's order. A resumed run
        skips it: D's warmed weights are in last/."""
        n, d = self.cfg.discriminator_warmup_steps, self.model.discriminator
        if not n or d is None or self.resume:
            return
        params = [p for p in d.parameters() if p.requires_grad]
        lr = self.cfg.discriminator_learning_rate or self.cfg.learning_rate
        optimizer = torch.optim.AdamW(params, lr=lr, eps=1e-8)
        self.model.train()
        for i in range(n):
            batch = self._next_batch(self.steps_per_epoch - 1 - i % self.steps_per_epoch)
            with autocast(self.device, self.dtype):
                out = self.model.discriminator_loss(batch)
            out["loss"].backward()
            distributed.average_gradients(params)
            if self.cfg.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            logged = distributed.mean_over_ranks({k: v for k, v in out.items() if k != "loss"})
            self._write_metrics({"kind": "d_warmup", "step": i + 1, **logged})
        log.info(
            "discriminator warm start: %d steps alone at lr %g; replaced-token recall %.2f, "
            "accuracy %.3f", n, lr, logged.get("rtd_rep_acc", float("nan")), logged["rtd_acc"],
        )  # fmt: skip

    def train_step(self, batch: dict[str, torch.Tensor]) -> dict[str, float]:
        self.model.train()
        if self.cfg.uses_discriminator:
            self.model.lambda_weight = self._lambda_now()
        with autocast(self.device, self.dtype):
            out = self.train_model(batch)
        loss = out["loss"]
        logged = distributed.mean_over_ranks(out)  # the global batch's numbers, on every rank
        value = logged["loss"]
        if not math.isfinite(value):
            kept = (
                f"the last good checkpoint is {self.last_dir} (step {self._last_step()})"
                if (self.last_dir / "trainer_state.json").is_file()
                else "no checkpoint had been written yet"
            )
            raise TrainingDiverged(
                f"step {self.state.step + 1}: the training loss is {value}; training stopped and "
                f"{kept}; try a lower learning_rate or precision fp32/bf16"
            )
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.unscale_(self.optimizer)
        else:
            loss.backward()
        if self.cfg.max_grad_norm > 0:
            params = [p for p in self.model.parameters() if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, self.cfg.max_grad_norm)
        if self.scaler is not None:
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {k: jsonable(v) for k, v in logged.items()}

    def _last_step(self) -> int:
        data = json.loads((self.last_dir / "trainer_state.json").read_text())
        return int(data["step"])

    def _describe(self) -> None:
        cfg, m = self.cfg, self.model
        parts = [f"encoder {cfg.model_name_or_path} ({_size(m.encoder)})"]
        if m.discriminator is not None:
            parts.append(f"discriminator ({_size(m.discriminator)})")
        if m.generator is not None:
            parts.append(f"frozen generator {cfg.generator_name_or_path}")
        log.info("model: %s", ", ".join(parts))
        mode = objective_name(cfg, self.objective)  # the table's and the card's name
        if cfg.uses_discriminator:
            mode += f" (lambda {cfg.lambda_weight})"
        precision = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(self.dtype, "fp32")
        log.info(
            "data: %d %s from %s; %d steps/epoch, %d steps; objective %s; %s %s",
            len(self.sentences), "sentences" if self.objective == "unsupervised" else "rows",
            cfg.train_file, self.steps_per_epoch, self.total_steps, mode,
            self.device.type, precision,
        )  # fmt: skip
        world = distributed.world_size()
        if world > 1:
            log.info(
                "distributed: %d processes (%s), batch_size %d each, global batch %d; "
                "negatives %s",
                world, torch.distributed.get_backend(), cfg.batch_size, cfg.batch_size * world,
                "from every rank" if self.model.gather_negatives else "per rank (not gathered)",
            )  # fmt: skip

    def run(self) -> TrainSummary:
        """Train to total_steps, from step 0 or (resume) from last/; returns the summary."""
        if self.resume:
            self._resume()
        self._describe()
        if not self.resume and self.eval_dir is not None:
            self._main_only(self._initial_evaluation)
        self._warm_start_discriminator()
        s = self.state
        started, first_step, train_seconds, last = time.perf_counter(), s.step, 0.0, {}
        with self._progress_bar() as bar, self.report:  # closes the event file on any exit
            while s.step < self.total_steps:
                tick = time.perf_counter()
                last = self.train_step(self._next_batch())  # batching, forward, backward, update
                train_seconds += time.perf_counter() - tick
                self._count_step(last)  # the position in the data, and the metrics line
                if self._due(self.cfg.eval_steps):
                    self._main_only(self._evaluate_and_keep_best)
                if self._due(self.cfg.save_steps):
                    self._save_last()
                bar.update(1)
                bar.set_postfix(self._postfix(last), refresh=False)
        seconds = time.perf_counter() - started
        return self._summarise(seconds, s.step - first_step, train_seconds, last)

    def _resume(self) -> None:
        """Restore last/ (weights, optimizer, schedule, every rank's RNGs, the position in the
        data) and drop the log lines of later steps: they are about to be redone."""
        self.state = s = checkpoint.load_last(
            self.last_dir, self.model, self.optimizer, self.scheduler, self.scaler,
            self.collator.generator, rank=distributed.rank(),
        )  # fmt: skip
        if s.world_size != distributed.world_size():
            raise DiffcseError(
                f"--resume: {self.last_dir} was written by {s.world_size} process(es), "
                f"this run has {distributed.world_size()}; the global batch depends on it, "
                "so resume with the same torchrun --nnodes x --nproc_per_node"
            )
        if distributed.is_main():
            self.run_dir.truncate_metrics(s.step)
        log.info("resuming from %s at step %d of %d", self.last_dir, s.step, s.total_steps)

    def _progress_bar(self):
        from tqdm.auto import tqdm

        quiet = None if distributed.is_main() else True  # one progress bar
        return tqdm(
            total=self.total_steps, initial=self.state.step, desc="diffcse-train", disable=quiet
        )

    def _next_batch(self, batch_in_epoch: int | None = None) -> dict[str, torch.Tensor]:
        """This rank's block of the next global batch (or of batch `batch_in_epoch` of the
        current epoch), in the epoch's seeded order."""
        s = self.state
        if self._order is None or self._order[0] != s.epoch:
            self._order = (s.epoch, epoch_order(len(self.sentences), self.cfg.seed, s.epoch))
        index = s.batch_in_epoch if batch_in_epoch is None else batch_in_epoch
        rows = distributed.rank_batch(
            self._order[1], index, self.cfg.batch_size,
            distributed.rank(), distributed.world_size(),
        )  # fmt: skip
        sentences = [self.sentences[i] for i in rows.tolist()]
        return {k: v.to(self.device) for k, v in self.collator(sentences).items()}

    def _count_step(self, last: dict) -> None:
        """A step is done: move the position in the data and log the step's numbers."""
        s = self.state
        s.step += 1
        s.batch_in_epoch += 1
        if s.batch_in_epoch == self.steps_per_epoch:
            s.epoch, s.batch_in_epoch = s.epoch + 1, 0
        lr = self.scheduler.get_last_lr()[0]
        record = {"kind": "train", "step": s.step, "epoch": self._epoch(), "lr": lr, **last}
        if self.cfg.uses_discriminator:
            record["lambda"] = self.model.lambda_weight
        self._write_metrics(record)

    def _epoch(self) -> float:
        """Epochs done, as a fraction."""
        return self.state.epoch + self.state.batch_in_epoch / self.steps_per_epoch

    def _due(self, every: int) -> bool:
        """Every `every` steps, and at the last one."""
        return self.state.step % every == 0 or self.state.step == self.total_steps

    def _summarise(self, seconds: float, steps: int, train_seconds: float, last: dict):
        s = self.state
        summary = TrainSummary(
            steps=s.step,
            seconds=seconds,
            steps_per_second=steps / train_seconds if train_seconds > 0 else 0.0,
            initial_score=s.initial_score,
            best_score=s.best_score,
            best_step=s.best_step,
            final_loss=last.get("loss"),
            output_dir=str(self.out),
            objective=self.objective,
        )
        self._report(summary)
        return summary

    def _initial_evaluation(self) -> None:
        s = self.state
        s.initial_score = self.evaluate()
        s.initial_scores = dict(self.dev_scores)
        log.info("before training: %s", self._describe_scores(s.initial_score))
        keep = self.cfg.keep_initial  # step 0 competes: a run that never beats it ships it
        if keep:
            s.best_score, s.best_step = s.initial_score, 0
            checkpoint.save_best(
                self.best_dir, self.model, self.tokenizer, self.cfg,
                self._best_metrics(s.initial_score),
            )  # fmt: skip
        record = {"kind": "eval", "step": 0, **self.dev_scores, "dev_score": s.initial_score}
        self._write_metrics({**record, "best": keep})

    def _postfix(self, last: dict) -> dict:
        post = {"loss": f"{last['loss']:.4f}"}
        if last.get("rtd_acc") is not None:
            post["rtd_acc"] = f"{last['rtd_acc']:.3f}"
        if self._last_dev is not None:
            post["dev"] = f"{self._last_dev:.2f}"
        return post

    def _report(self, summary: TrainSummary) -> None:
        if not distributed.is_main():
            return
        log.info(
            "reached step %d; this session %.1f s, training at %.2f steps/s; model: %s",
            summary.steps, summary.seconds, summary.steps_per_second, self.best_dir,
        )  # fmt: skip
        if summary.best_score is not None:
            before = "n/a" if summary.initial_score is None else f"{summary.initial_score:.2f}"
            every = " on every dev task" if self.cfg.gain_on_every_task else ""
            log.info(
                "dev Spearman x100 (%s): before training %s, best %.2f at step %d%s",
                "+".join(t for t in self.eval_tasks if t in self.cfg.select_tasks), before,
                summary.best_score, summary.best_step,
                f"; no step beat the input model{every}, so best/ is the input model"
                if summary.best_step == 0 else "",
            )  # fmt: skip
        path = self.report.finish(summary.best_step)  # report.png + report.json
        summary.report = str(path) if path else None
        self.run_dir.write_summary(summary)


def train(cfg: TrainConfig, resume: bool = False, overwrite: bool = False) -> TrainSummary:
    """Train `cfg` end to end (the library entry point behind `diffcse-train`).

    Under torchrun every process calls this; it joins and finally leaves the process group.
    A config built in code is checked as a config file is (ranges, consistency) first.
    """
    validate(cfg)
    try:
        setup = prepare_run(cfg, resume, overwrite)  # the cheap checks, before anything slow
        check_available(cfg)  # matplotlib / tensorboard, before a generator is fitted
        ensure_generator(cfg)  # fit_generator: true fits a missing G now, before a model needs it
        summary = Trainer(cfg, resume, setup=setup).run()
    except BaseException:
        distributed.teardown(clean=False)
        raise
    distributed.teardown(clean=True)
    return summary
