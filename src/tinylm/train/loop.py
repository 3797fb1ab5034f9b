"""Training: one loop for every recipe, on a CPU (fp32, every core) or GPUs (bf16 autocast, DDP under torchrun).

The global batch of step s is one draw of batch_size x grad_accum x world_size blocks from the sampler (which depends
only on the seed and s); rank r takes its slice and splits it into grad_accum micro-batches. So a step sees the same
data whatever the number of processes, and two processes with accumulation A give the weights of one with 2A.
Dropout is reseeded from (seed, rank, step) at every step: a resumed run draws the same masks as an unbroken one.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from tinylm.data.prepare import prepare_run_inputs
from tinylm.data.shards import BatchSampler, TokenShard, eval_batches
from tinylm.data.tokenizer import Tokenizer, load_tokenizer
from tinylm.errors import TinylmError
from tinylm.models import build_model
from tinylm.models.weights import load_checked
from tinylm.recipe import Recipe, recipe_to_toml
from tinylm.storage.atomic import atomic_write_json, atomic_write_text, make_dir
from tinylm.storage.rundir import RunDir, step_dir_name
from tinylm.train import checkpoints as ckpt
from tinylm.train.evaluation import bits_per_byte, eval_batch_size, loss_sums
from tinylm.train.initialization import Initialization, adopt_tokenizer
from tinylm.train.metrics import MetricsFile, hardware_description, log_line, peak_flops
from tinylm.train.optimizer import build_optimizer
from tinylm.train.resume import check_resumable, resume_checkpoint
from tinylm.train.rng import capture_rng, restore_rng, step_seed
from tinylm.train.runtime import (
    Placement,
    StopRequest,
    accumulate_gradients,
    apply_update,
    setup_placement,
)
from tinylm.train.schedule import learning_rate
from tinylm.train.trackers import Trackers, check_trackers


def _rank0_first(place: Placement, work):
    """Run `work` on rank 0 while the others wait; a TinylmError there stops every rank with the same message."""
    message = None
    if place.main:
        try:
            work()
        except TinylmError as exc:
            message = str(exc)
    if place.world > 1:
        box = [message]
        dist.broadcast_object_list(box, src=0)
        message = box[0]
    if message is not None:
        raise TinylmError(message)


def prepare_run_data(recipe: Recipe, run: RunDir, place: Placement, progress: bool) -> Tokenizer:
    """tokenizer.json and data/ in the run directory: built on first use, reused after (rank 0 builds)."""
    _rank0_first(place, lambda: prepare_run_inputs(recipe, run, progress))
    return load_tokenizer(run.tokenizer_file)


def write_run_json(run: RunDir, recipe: Recipe, place: Placement, command: str | None, tokens_per_step: int,
                   resumed_from: int | None, init: Initialization | None = None) -> dict[str, Any]:
    old = {}
    with contextlib.suppress(TinylmError):  # a damaged run.json only loses the history
        old = run.read_run_info()
    history = old.pop("history", []) + ([old] if old and resumed_from is not None else [])
    info = {"command": command, "started": datetime.now(UTC).isoformat(timespec="seconds"),
            "recipe": recipe.name, "hardware": hardware_description(place.device), "torch": torch.__version__,
            "world_size": place.world, "device": str(place.device), "dtype": place.dtype, "threads": place.threads,
            "tokens_per_step": tokens_per_step, "resumed_from": resumed_from, "history": history}
    if init is not None:
        info["init_from"] = {"source": init.source, "hub_id": init.hub_id}
    atomic_write_json(run.run_file, info)
    return info


@dataclass(frozen=True)
class TrainSummary:
    """How a training session ended."""

    rank: int
    step: int
    stopped: str  # max_steps, max_minutes, stop_after or interrupted
    tokens: int
    val_loss: float | None
    best_val_loss: float | None
    checkpoint: str | None


def train(recipe: Recipe, run_dir: str | Path, resume: bool | str = False, command: str | None = None,
          progress: bool = True, stop_after: int | None = None, init: Initialization | None = None) -> TrainSummary:
    """Train `recipe` into `run_dir`, or continue it: `resume=True` from its latest complete checkpoint, a name
    (step-NNNNNNNN) from that one. Returns a summary of the run.

    `stop_after` ends this session cleanly (evaluation, checkpoint) once that many steps are done, leaving the
    schedule as it is: `--resume` later continues exactly where it stopped. `init` starts a new run from existing
    weights."""
    check_trackers(recipe.train.report_to)  # before any work
    place = setup_placement(recipe.train)
    try:
        trainer = Trainer(recipe, RunDir(run_dir), place, resume, command, progress, init)
        try:
            return trainer.run(stop_after)
        finally:
            trainer.trackers.close()
    finally:
        if place.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


class Trainer:
    def __init__(self, recipe: Recipe, run: RunDir, place: Placement, resume: bool | str, command: str | None,
                 progress: bool, init: Initialization | None = None):
        self.recipe, self.run_dir, self.place, self.progress = recipe, run, place, progress
        self.clock = time.perf_counter()
        if init is not None and resume:
            raise TinylmError("--init-from starts a new run and --resume continues one: give one of them")
        resume_from = self._resume_point(resume)
        if place.main:
            make_dir(run.path)
        if init is not None:  # before the data: the shards are made with the source's tokenizer
            _rank0_first(place, lambda: adopt_tokenizer(run, init))
        self.tokenizer = prepare_run_data(recipe, run, place, progress)
        if place.main:  # written once the data fit the recipe: a refused start leaves the run's recipe as it was
            atomic_write_text(run.recipe_file, recipe_to_toml(recipe))
        config, context = recipe.train, recipe.model.context_length
        self.train_shard = TokenShard(run.data_dir / "train.bin", self.tokenizer)
        self.val_shard = TokenShard(run.data_dir / "val.bin", self.tokenizer)
        self.rows = config.batch_size * config.grad_accum  # this rank's rows of the global batch
        self.sampler = BatchSampler(self.train_shard, self.rows * place.world, context, config.seed)
        self.tokens_per_step = self.rows * place.world * context

        torch.manual_seed(config.seed)  # the same initial weights on every rank
        self.model = build_model(recipe.model)
        if init is not None:
            load_checked(self.model, init.weights, f"--init-from {init.source}")
            self.say(f"starting from the weights of {init.source} (fresh optimizer and schedule)")
        self.model.to(place.device)
        where = f"{place.threads} thread{'s' * (place.threads > 1)}" if place.device.type == "cpu" else "1 GPU"
        self.say(f"{recipe.name}: {sum(p.numel() for p in self.model.parameters()):,} parameters on {place.device} "
                 f"({place.dtype}, {where} per process, {place.world} process{'es' * (place.world > 1)})")
        self.optimizer = build_optimizer(self.model, config, report=self.say)
        self.step, self.best_val, self.elapsed_before = 0, math.inf, 0.0
        if resume_from is not None:
            self._restore(resume_from)
        self.say(f"tokens per step: {self.tokens_per_step:,} = batch {config.batch_size} x context {context} x "
                 f"accumulation {config.grad_accum} x processes {place.world}")
        self.fingerprint = self.tokenizer.fingerprint()
        self.metrics = MetricsFile(run.metrics_file)
        if place.main:  # resumed: drop lines logged after the checkpoint; fresh: drop those of a crashed attempt
            self.metrics.truncate_after(self.step if resume_from is not None else -1)
            self.run_info = write_run_json(run, recipe, place, command, self.tokens_per_step,
                                           self.step if resume_from is not None else None, init)
        self.forward_model = self._forward_model()
        self.flops_per_token = self.model.flops_per_token()
        self.peak = peak_flops(place.device.type, torch.cuda.get_device_name(place.device)
                               if place.device.type == "cuda" else "") * place.world
        self.last_val: float | None = None
        self.trackers = Trackers(recipe.train.report_to if place.main else [], run, recipe)  # opened last

    def _resume_point(self, resume: bool | str) -> Path | None:
        """The checkpoint to continue from (None for a fresh run), checked before anything is written."""
        run = self.run_dir
        if not resume:
            if run.has_checkpoints():
                raise TinylmError(f"{run.path} already holds a trained run: pass --resume to continue it, or --out "
                                  "elsewhere")
            return None
        check_resumable(self.recipe, run, self.place.world)
        return resume_checkpoint(run, self.recipe, "latest" if resume is True else resume)

    def _forward_model(self) -> torch.nn.Module:
        """The module the steps call: compiled when the recipe asks, wrapped for data parallelism across ranks."""
        model = torch.compile(self.model) if self.recipe.train.compile else self.model
        if self.place.world > 1:
            from torch.nn.parallel import DistributedDataParallel

            model = DistributedDataParallel(model, device_ids=[self.place.local_rank]
                                            if self.place.device.type == "cuda" else None)
        return model

    def say(self, text: str) -> None:
        if self.place.main:
            from tqdm.auto import tqdm

            tqdm.write(text)

    def elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.clock

    # ----------------------------------------------------------------------------------------------- checkpoints
    def _restore(self, path: Path) -> None:
        ckpt.load_weights(self.model, path / ckpt.WEIGHTS_FILE)
        state = ckpt.load_state(path)
        try:
            self.optimizer.load_state_dict(state["optimizer"])
            self.sampler.load_state_dict(state["sampler"])
            self.step, self.best_val = int(state["step"]), float(state["best_val_loss"])
            self.elapsed_before = float(state.get("elapsed_s", 0.0))
            restore_rng(state["rng"])
        except (KeyError, ValueError, TypeError) as exc:
            raise TinylmError(f"{path / ckpt.STATE_FILE}: not a state this run can resume from ({exc})") from None
        self.say(f"resuming from {path.name} (step {self.step})")

    def save(self, as_best: bool, as_step: bool) -> Path | None:
        if not self.place.main or not (as_best or as_step):
            return None
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(), "sampler": self.sampler.state_dict(),
                 "rng": capture_rng(), "best_val_loss": self.best_val, "elapsed_s": self.elapsed(),
                 "tokens": self.step * self.tokens_per_step, "world_size": self.place.world}
        info = {"tokenizer_fingerprint": self.fingerprint, "val_loss": self.last_val,
                "tokens": self.step * self.tokens_per_step}
        checkpoints = self.run_dir.checkpoints_dir
        if not as_step:  # a new best between regular checkpoints
            return ckpt.save_checkpoint(checkpoints, self.step, self.model, state, info, name="best")
        if as_best:  # best first: a crash before the step copy resumes from an older step and remakes this best
            ckpt.save_checkpoint(checkpoints, self.step, self.model, state, info, name="best")
            path = checkpoints / step_dir_name(self.step)
            ckpt.copy_checkpoint(checkpoints / "best", path)
        else:
            path = ckpt.save_checkpoint(checkpoints, self.step, self.model, state, info)
        ckpt.prune_checkpoints(self.run_dir, self.recipe.train.keep_last)
        return path

    # ------------------------------------------------------------------------------------------------ evaluation
    def measure(self) -> tuple[float, float]:
        """(train loss, val loss) on eval_batches fixed batches of each split."""
        config, context = self.recipe.train, self.recipe.model.context_length
        size = eval_batch_size(config.batch_size, context, self.recipe.model.vocab_size)
        probe = BatchSampler(self.train_shard, size, context, seed=config.seed + 1)  # fixed probe batches
        args = dict(device=self.place.device, autocast=self.place.autocast, max_batches=config.eval_batches,
                    rank=self.place.rank, world=self.place.world)
        train_nats, train_count = loss_sums(self.model, probe, **args)
        val_nats, val_count = loss_sums(self.model, eval_batches(self.val_shard, size, context), **args)
        return train_nats / train_count, val_nats / val_count

    def evaluate_and_record(self) -> bool:
        """Measure, log and append to metrics.jsonl; returns whether the val loss is the best so far (and keeps it)."""
        train_loss, val_loss = self.measure()
        # bits per byte of the measured part, scaled by the split's bytes per predicted token
        bpb = bits_per_byte(val_loss * (self.val_shard.n_tokens - 1), self.val_shard.n_bytes)
        self.last_val = val_loss
        self.say(f"step {self.step}: train loss {train_loss:.4f}, val loss {val_loss:.4f}, val bpb {bpb:.4f}")
        self.record({"step": self.step, "tokens": self.step * self.tokens_per_step,
                     "time_s": round(self.elapsed(), 3), "train_loss": train_loss, "val_loss": val_loss,
                     "val_bpb": bpb})
        improved = self.step > 0 and val_loss < self.best_val
        if improved:
            self.best_val = val_loss
        return improved

    # ------------------------------------------------------------------------------------------------- the loop
    def train_step(self, stop_requested: bool) -> tuple[float, bool]:
        """One optimizer update; returns (mean loss over the global batch, whether any rank asks to stop)."""
        config, place = self.recipe.train, self.place
        self.optimizer.set_lr_scale(learning_rate(self.step, config) / config.lr)
        torch.manual_seed(step_seed(config.seed, place.rank, self.step))
        x_all, y_all = next(self.sampler)
        rows = slice(place.rank * self.rows, (place.rank + 1) * self.rows)
        micro_batches = zip(x_all[rows].chunk(config.grad_accum), y_all[rows].chunk(config.grad_accum), strict=True)
        loss = accumulate_gradients(self.forward_model, micro_batches, config.grad_accum, place)
        shared = torch.stack([loss, torch.tensor(float(stop_requested), device=place.device)])
        if place.world > 1:
            dist.all_reduce(shared)
        loss_value, stop = float(shared[0]) / place.world, bool(shared[1] > 0)
        if not math.isfinite(loss_value):
            last = self.run_dir.step_checkpoints()
            raise TinylmError(f"loss is {loss_value} at step {self.step + 1}: training stopped; the last good "
                              f"checkpoint ({last[-1].name if last else 'none yet'}) is intact "
                              "(try a lower train.lr or a longer train.warmup_steps)")
        apply_update(self.model, self.optimizer, config.grad_clip)
        self.step += 1
        return loss_value, stop

    def run(self, stop_after: int | None = None) -> TrainSummary:
        from tqdm.auto import tqdm

        config = self.recipe.train
        if self.step >= config.max_steps:
            self.say(f"already at step {self.step} of train.max_steps {config.max_steps}: nothing to do")
            return self.finish("max_steps", None)
        if self.step == 0:
            self.evaluate_and_record()
        budget = config.max_minutes * 60.0
        bar = tqdm(total=config.max_steps, initial=self.step, unit="step", dynamic_ncols=True,
                   disable=None if self.progress and self.place.main else True)  # None: only on a terminal
        reason, interval_start, interval_steps = None, time.perf_counter(), 0
        with StopRequest() as stop_request, bar:
            while reason is None:
                over_budget = budget > 0 and time.perf_counter() - self.clock >= budget
                loss, stop = self.train_step(stop_request.signal is not None or over_budget)
                bar.update(1)
                interval_steps += 1
                if stop:
                    reason = "interrupted" if stop_request.signal is not None else "max_minutes"
                elif self.step >= config.max_steps:
                    reason = "max_steps"
                elif stop_after is not None and self.step >= stop_after:
                    reason = "stop_after"
                if self.step % config.log_interval == 0 or reason:
                    interval_start = self.log(loss, interval_start, interval_steps)
                    interval_steps = 0
                improved, evaluated = False, False
                if reason in ("max_steps", "max_minutes", "stop_after") or self.step % config.eval_interval == 0:
                    improved, evaluated = self.evaluate_and_record(), True
                regular = reason is not None or self.step % config.checkpoint_interval == 0
                saved = self.save(as_best=improved, as_step=regular)
                if evaluated or saved is not None:
                    interval_start = time.perf_counter()  # evaluation and saving are not training speed
        return self.finish(reason, stop_request.signal)

    def log(self, loss: float, interval_start: float, steps: int) -> float:
        now = time.perf_counter()
        seconds = (now - interval_start) / max(steps, 1)
        tokens_per_s = self.tokens_per_step / seconds
        mfu = tokens_per_s * self.flops_per_token / self.peak
        lr = learning_rate(self.step - 1, self.recipe.train)
        self.say(log_line(self.step, loss, lr, seconds * 1000, tokens_per_s, mfu))
        self.record({"step": self.step, "tokens": self.step * self.tokens_per_step,
                     "time_s": round(self.elapsed(), 3), "lr": lr, "loss": loss, "ms_per_step": seconds * 1000,
                     "tokens_per_s": tokens_per_s, "mfu": mfu})
        return now

    def record(self, row: dict[str, Any]) -> None:
        """One line of metrics.jsonl, and the same figures to the recipe's trackers (rank 0)."""
        if self.place.main:
            self.metrics.append(row)
            self.trackers.log(row)

    def finish(self, reason: str, signum: int | None) -> TrainSummary:
        self.place.barrier()
        latest = self.run_dir.step_checkpoints()
        if self.place.main:
            self.run_info.update({"final_step": self.step, "stopped": reason, "wall_time_s": round(self.elapsed(), 3),
                                  "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                                  "best_val_loss": self.best_val if math.isfinite(self.best_val) else None})
            atomic_write_json(self.run_dir.run_file, self.run_info)
        if reason == "interrupted":
            self.say(f"interrupted at step {self.step}: saved {latest[-1] if latest else 'nothing'}; "
                     "continue with --resume")
            raise KeyboardInterrupt
        return TrainSummary(rank=self.place.rank, step=self.step, stopped=reason,
                            tokens=self.step * self.tokens_per_step,
                            val_loss=self.last_val,
                            best_val_loss=self.best_val if math.isfinite(self.best_val) else None,
                            checkpoint=str(latest[-1]) if latest else None)
