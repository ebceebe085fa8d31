"""Training: ``train(config)`` runs one MLflow run from start (or from where it stopped) to end.

The loop is CompressAI's (main optimizer on the transforms, a second optimizer on the entropy
bottlenecks' quantiles, gradient clipping) plus what a platform owes its users: validation with
a monitored metric, a learning-rate schedule, early stopping, atomic checkpoints (last and
best) uploaded to MLflow, resuming the same run with metric steps continuing, checkpoint-and-exit
on SIGTERM/SIGUSR1 (preemption), and a clear stop on a non-finite loss.
"""

from __future__ import annotations

import logging
import math
import os
import random
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from torch.utils.data import DataLoader

from taskcodec import checkpoints, distributed, signals, speed, tracking
from taskcodec.config import LoopConfig
from taskcodec.errors import CheckpointError, ConfigError, TrackingError, TrainingError
from taskcodec.recipes import Recipe, higher_is_better, recipe_for

log = logging.getLogger(__name__)

PREEMPTED_EXIT = signals.PREEMPTED_EXIT  # defined once, in the torch-free signals module
_RESUMABLE = ("epochs", "max_steps", "num_workers", "device", "log_every", "checkpoint_every",
              "early_stop_patience", "checkpoint_dir", "max_minutes", "compile", "channels_last",
              "precision", "tf32", "rd_every", "rd_images", "cache_mb")
# Settings that name the run rather than shape it: never a conflict on resume.
_IDENTITY = ("resume", "run_name")
# Settings of this process only (what it logs and publishes): a resume takes the given value.
_PER_PROCESS = ("register_as", "system_metrics")


def progress_enabled() -> bool:
    return (sys.stderr.isatty() and not os.environ.get("CI")
            and os.environ.get("TQDM_DISABLE", "") in ("", "0"))


def pick_device(name: str) -> torch.device:
    if name == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device=cuda but no CUDA device is available (use device=cpu or auto)")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)


def configure_optimizers(model: nn.Module, lr: float, aux_lr: float):
    """Adam on everything but the entropy bottlenecks' quantiles, which get their own Adam."""
    main = [p for n, p in model.named_parameters() if not n.endswith(".quantiles") and p.requires_grad]
    aux = [p for n, p in model.named_parameters() if n.endswith(".quantiles") and p.requires_grad]
    return torch.optim.Adam(main, lr=lr), torch.optim.Adam(aux, lr=aux_lr)


def build_scheduler(config: LoopConfig, optimizer: torch.optim.Optimizer, monitor: str):
    if config.lr_scheduler == "plateau":
        return torch.optim.lr_scheduler.ReduceLROnPlateau(
            optimizer, mode="max" if higher_is_better(monitor) else "min",
            factor=0.1, patience=config.lr_patience)
    if config.lr_scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    return None  # warmup-cosine is set per step (see _warmup_cosine)


def _warmup_cosine(config: LoopConfig, step: int, progress: float) -> float:
    """Factor of lr at ``step``: linear warm-up, then cosine from 1 to 0.1 over the budget."""
    if step < config.warmup_steps:
        return (step + 1) / config.warmup_steps
    return 0.1 + 0.45 * (1 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))


@dataclass
class TrainState:
    epoch: int = 0          # the epoch being trained (0-based)
    epoch_step: int = 0     # optimizer steps already done inside that epoch
    step: int = 0           # optimizer steps done in total (the MLflow metric step)
    best: float | None = None
    bad_validations: int = 0
    seconds: float = 0.0    # training time so far (validation excluded), for max_minutes
    history: list[dict[str, float]] = field(default_factory=list)


class _Preempted(Exception):
    pass


class _NullLogger:
    """What ranks other than 0 log to: nothing (rank 0 logs for the run)."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: [] if name == "unsent_metrics" else None


def _loss_items(losses: dict[str, torch.Tensor]) -> dict[str, float]:
    return {k: float(v.detach()) for k, v in losses.items()}


class Trainer:
    """Runs one recipe as one MLflow run: loop, checkpoints, signals, resume, logging."""

    def __init__(self, config: LoopConfig, recipe: Recipe | None = None) -> None:
        self.config = config
        self.recipe = recipe or recipe_for(config)
        self.dist = distributed.init(config.device)
        self.resumed_with: dict = {}  # resumable settings that a resume changed
        self.device = distributed.device(self.dist, config.device) if self.dist.enabled \
            else pick_device(config.device)

    # -- run lifecycle -------------------------------------------------------------------------
    def run(self) -> str:
        """Rank 0 owns the MLflow run; other ranks (under torchrun) follow it."""
        try:
            if not self.dist.is_main:
                return self._follow()
            return self._lead()
        finally:
            distributed.shutdown(self.dist)
            signals.uninstall()

    def _follow(self) -> str:
        run_id, ckpt, stored = distributed.broadcast(None, self.dist)
        self.ckpt_dir = Path(stored.get("checkpoint_dir") or Path("checkpoints") / run_id)
        self._adopt_stored_config(stored)
        self.logger = _NullLogger()
        signals.install()
        self._train(run_id, ckpt)
        return run_id

    def _lead(self) -> str:
        import mlflow

        config = self.config
        uri = tracking.tracking_uri()
        tracking.check_reachable(uri)
        mlflow.set_tracking_uri(uri)
        resume_id = config.resume or os.environ.get("TASKCODEC_RESUME_RUN_ID", "")
        self.init_ckpt = None
        if config.init_from and not resume_id:  # its architecture, before a run is created
            self.init_ckpt = self._adopt_architecture(config.init_from)
            config = self.config
        self.recipe.prepare()  # refuse a bad base run before a run is created
        metrics_interval = tracking.metrics_interval_from_env()  # and a bad interval
        run_id = resume_id or os.environ.get("MLFLOW_RUN_ID", "")
        client = mlflow.tracking.MlflowClient(uri)
        ckpt = None
        if run_id:
            try:
                stored_run = client.get_run(run_id)
            except Exception:
                raise TrackingError(f"cannot resume: no MLflow run {run_id!r} at {uri}") from None
            # A resumed run keeps the checkpoint folder it was started with unless told otherwise.
            started_with = stored_run.data.params.get("checkpoint_dir", "")
            self.ckpt_dir = Path(config.checkpoint_dir or started_with or Path("checkpoints") / run_id)
            ckpt = self._find_resume_checkpoint(run_id, uri)
            if ckpt is None and resume_id:
                log.warning("run %s has no checkpoint yet: starting it from scratch", run_id)
            if ckpt is not None:  # a conflicting setting is refused before the run is touched
                self._adopt_stored_config(ckpt["config"], run_id=run_id)
            tracking.check_run_artifacts(run_id, uri)  # where checkpoints go, before training
            active = mlflow.start_run(run_id=run_id, log_system_metrics=self._system_metrics())
        else:
            tracking.check_experiment_artifacts(tracking.experiment_name(), uri)
            mlflow.set_experiment(tracking.experiment_name())
            active = mlflow.start_run(run_name=config.run_name or None,
                                      log_system_metrics=self._system_metrics())
            self.ckpt_dir = Path(config.checkpoint_dir or Path("checkpoints") / active.info.run_id)
        run_id = active.info.run_id
        distributed.broadcast((run_id, ckpt, {**self.config.to_dict(),
                                              "checkpoint_dir": str(self.ckpt_dir)}), self.dist)
        skip = tracking.logged_max_step(run_id, "loss", uri) if ckpt is not None else -1
        self.logger = tracking.RunLogger(run_id, uri=uri, spool_dir=self.ckpt_dir,
                                         skip_until_step=skip, metrics_interval=metrics_interval)
        if ckpt is not None and ckpt.get("unsent_metrics"):
            # Logged before the checkpoint but never sent: a killed process left a gap.
            self.logger.resend_metrics(ckpt["unsent_metrics"])
        already = client.get_run(run_id).data.params
        self.logger.log_params({k: v for k, v in self.config.to_params().items()
                                if k not in already})
        self.logger.set_tags({**self.recipe.tags(), "entry_point": self.config.entry_point,
                              "seed": str(self.config.seed),
                              "data_seed": str(self.config.data_seed),
                              **tracking.environment_tags()})
        if self.resumed_with:  # params are immutable in MLflow: the new values go in tags
            self.logger.set_tags({f"resumed.{k}": str(v) for k, v in self.resumed_with.items()})
        status = "FAILED"
        try:
            signals.install()
            self._train(run_id, ckpt)
            status = "FINISHED"
        except _Preempted:
            status = "KILLED"
            raise
        finally:
            unsent = self.logger.close()
            if unsent:
                log.warning("%d logging calls could not be sent to %s", len(unsent), uri)
            unpublished = self._publish_model(run_id, uri) if status == "FINISHED" else ""
            try:
                mlflow.end_run(status)
            except Exception as err:  # the server may still be away: the run stays RUNNING
                log.warning("could not mark run %s %s: %s", run_id, status, err)
        lost = [u for u in unsent if u.startswith("artifact")]
        if lost:  # a training that "succeeded" without its checkpoints would be lost work
            raise TrackingError(f"{len(lost)} checkpoint uploads of run {run_id} failed; the "
                                f"checkpoints are in {self.ckpt_dir} (upload them with "
                                f"mlflow artifacts log-artifacts --run-id {run_id} "
                                f"--local-dir {self.ckpt_dir} --artifact-path checkpoints)")
        if unpublished and self.config.register_as:  # asked for, so not only a warning
            raise TrackingError(unpublished)
        return run_id

    def _system_metrics(self) -> bool | None:
        """True with --system-metrics true; else None: $MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
        (set in launched jobs) decides."""
        return True if self.config.system_metrics else None

    def _publish_model(self, run_id: str, uri: str) -> str:
        """Log the codec as an MLflow model (and register it with --register-as); '' when
        done, else why not, with the command that does it later. Training is not lost for it."""
        from taskcodec import model_registry

        local = next((p for p in (self.ckpt_dir / "best.pt", self.ckpt_dir / "last.pt")
                      if p.is_file()), None)
        try:
            found = model_registry.publish(run_id, self.config.register_as, ckpt_path=local,
                                           uri=uri)
        except Exception as err:  # the server may be away; the checkpoints are safe
            text = str(err).strip().splitlines()[0][:200] if str(err).strip() else repr(err)
            why = (f"run {run_id} trained, but its model was not logged or registered ({text}); "
                   f"do it with: taskcodec register {run_id} "
                   f"{self.config.register_as.partition('@')[0] or 'NAME'}")
            log.warning("%s", why)
            return why
        if found is not None:
            log.info("registered run %s as %s", run_id, found)
        return ""

    def _find_resume_checkpoint(self, run_id: str, uri: str) -> dict | None:
        local = self.ckpt_dir / "last.pt"
        if local.is_file():
            return checkpoints.load(local)
        if tracking.run_has_artifact(run_id, f"{checkpoints.ARTIFACT_DIR}/last.pt", uri):
            path = tracking.download_artifact(run_id, f"{checkpoints.ARTIFACT_DIR}/last.pt",
                                              self.ckpt_dir / ".download", uri)
            return checkpoints.load(path)
        return None

    def _adopt_stored_config(self, stored: dict, run_id: str = "") -> None:
        """A resumed run keeps its settings; only how long/where it runs may change.

        With ``run_id`` (the run's owner), a setting given explicitly that the run cannot change
        (``--lmbda 0.5`` on a λ = 0.013 run) is refused instead of silently ignored.
        """
        given = self.config
        cls = type(given)
        # Only what the user set (a value other than the default) overrides the stored setting:
        # `train --resume RUN_ID` alone must not reset max_steps, log_every, ... to defaults.
        defaults = {f.name: f.default for f in cls.fields()}
        if run_id:
            for f in cls.fields():
                value = getattr(given, f.name)
                if (f.name in _RESUMABLE or f.name in _IDENTITY or f.name in _PER_PROCESS
                        or f.name not in stored or f.name in given.derived()
                        or value == defaults[f.name] or value == stored[f.name]):
                    continue
                raise ConfigError(
                    f"{f.name}={value} conflicts with run {run_id}, which was trained with "
                    f"{f.name}={stored[f.name]}: a resumed run keeps its settings (only "
                    f"{', '.join(_RESUMABLE)} may change); to train with {f.name}={value}, "
                    f"start a new run with --init-from {run_id}")
        changed = {k: getattr(given, k) for k in _RESUMABLE if getattr(given, k) != defaults[k]}
        self.resumed_with = {k: v for k, v in changed.items() if stored.get(k) != v}
        merged = {**stored, **changed, "resume": given.resume,
                  **{k: getattr(given, k) for k in _PER_PROCESS}}
        self.config = cls.from_dict({k: v for k, v in merged.items()
                                     if k in {f.name for f in cls.fields()}})
        self.recipe = recipe_for(self.config)

    def _adopt_architecture(self, ref: str) -> dict:
        """Take what shapes the model from the checkpoint ``--init-from`` names, unless the user
        set it; a setting the user gave that the weights cannot have is one line naming both."""
        given, cls = self.config, type(self.config)
        defaults = {f.name: f.default for f in cls.fields()}
        # A CompressAI file's codec: recognised from its weights unless --codec was given.
        hint = getattr(given, "codec", "")
        ckpt, where = checkpoints.load_ref(ref, "best", "" if hint == defaults.get("codec") else hint)
        source_entry = ckpt.get("entry_point", given.entry_point)
        if source_entry != given.entry_point:
            raise CheckpointError(f"init_from={ref} is a {source_entry} checkpoint; "
                                  f"{given.entry_point} cannot start from its weights")
        stored = ckpt["config"]
        adopted = {}
        for name in cls.architecture:
            if name not in stored or stored[name] == getattr(given, name):
                continue
            if name in given.derived():  # follows the rest (cheng2020's M: N)
                continue
            if (stored[name], getattr(given, name)) in cls.fits_weights.get(name, ()):
                continue
            if getattr(given, name) != defaults[name]:
                raise ConfigError(f"{name}={getattr(given, name)} conflicts with init_from={ref}, "
                                  f"whose weights have {name}={stored[name]} (leave {name} out "
                                  "to take it from there)")
            adopted[name] = stored[name]
        if adopted:
            log.info("init_from %s: %s", where, ", ".join(f"{k}={v}" for k, v in adopted.items()))
            values = {**given.to_dict(), **adopted}
            for name in given.derived() - set(adopted):  # to follow what was adopted
                values.pop(name)
            self.config = cls.from_dict(values)
            self.recipe = recipe_for(self.config)
        return ckpt

    # -- training ----------------------------------------------------------------------------
    def _train(self, run_id: str, ckpt: dict | None) -> None:
        config = self.config
        recipe = self.recipe
        seed_everything(config.seed)
        self.model_args = ckpt["model_args"] if ckpt and "model_args" in ckpt \
            else recipe.model_args()
        model = recipe.build_model(self.model_args).to(self.device)
        self.channels_last = speed.channels_last_for(config)
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        optimizer, aux_optimizer = configure_optimizers(recipe.trainable(model), config.lr,
                                                        config.aux_lr)
        scheduler = build_scheduler(config, optimizer, recipe.monitor)
        state = TrainState()
        if ckpt is not None:
            model.load_state_dict(ckpt["model"])
            optimizer.load_state_dict(ckpt["optimizer"])
            aux_optimizer.load_state_dict(ckpt["aux_optimizer"])
            if scheduler is not None and ckpt.get("lr_scheduler"):
                scheduler.load_state_dict(ckpt["lr_scheduler"])
            state = TrainState(epoch=ckpt["epoch"], epoch_step=ckpt["epoch_step"],
                               step=ckpt["step"], best=ckpt.get("best"),
                               bad_validations=ckpt.get("bad_validations", 0),
                               seconds=ckpt.get("seconds", 0.0))
            log.info("resuming run %s at epoch %d, step %d", run_id, state.epoch, state.step)
            done = _budget_used(config, state)
            if done:  # a requeue after completion: nothing to train, nothing to log twice
                log.warning("run %s is already complete (%s): nothing to train; resume with a "
                            "larger --max-steps or --epochs to train it further", run_id, done)
                return
        elif config.init_from:
            init_weights(model, config.init_from, getattr(self, "init_ckpt", None))
            self.logger.set_tags({"init_from": config.init_from})
        else:
            recipe.initialise(model)
        if ckpt is None:
            self.logger.log_params({k: str(v) for k, v in recipe.model_params(model).items()})
        train_set, val_set = recipe.datasets()
        if ckpt is None and self.dist.is_main:
            self._log_datasets(train_set, val_set)
        # Under DDP an epoch still covers the data set once: each rank takes its share.
        steps_per_epoch = max(1, len(train_set) // (config.batch_size * self.dist.world_size))
        self.ddp_model = distributed.wrap(model, recipe.trainable(model), self.dist)
        self.aux_params = [p for g in aux_optimizer.param_groups for p in g["params"]]
        self.model, self.optimizer, self.aux_optimizer = model, optimizer, aux_optimizer
        self.scheduler, self.state, self.run_id = scheduler, state, run_id
        self.steps_per_epoch = steps_per_epoch
        self._speed_up(model, steps_per_epoch)
        model.train()
        rd_every = getattr(config, "rd_every", 0)
        while state.epoch < config.epochs:
            finished_budget = self._train_epoch(train_set, steps_per_epoch)
            epoch_done = state.epoch_step >= steps_per_epoch
            if epoch_done:
                state.epoch += 1
                state.epoch_step = 0
            if epoch_done and (state.epoch % config.val_every == 0 or state.epoch == config.epochs
                               or finished_budget):
                if self._validate_and_schedule(val_set):
                    log.info("early stopping after %d validations without improvement of %s",
                             state.bad_validations, config.monitor)
                    finished_budget = True
            elif finished_budget and not state.history:
                self._validate_and_schedule(val_set)
            if rd_every and ((epoch_done and state.epoch % rd_every == 0) or finished_budget):
                self._log_rd_point(val_set)
            self._checkpoint("last")
            if finished_budget:
                break

    def _log_datasets(self, train_set, val_set) -> None:
        """The training and validation sets as the run's dataset inputs (the UI's Datasets)."""
        from taskcodec.evaluate import listing_info

        c = self.config
        self.logger.log_datasets([(listing_info(data, c.data, split, c.data_seed), context)
                                  for data, split, context in ((train_set, "train", "training"),
                                                               (val_set, "val", "validation"))])

    def _speed_up(self, model: nn.Module, steps_per_epoch: int) -> None:
        """Apply the speed switches (see :mod:`taskcodec.speed`) and say which are on."""
        config, state = self.config, self.state
        speed.set_tf32(config.tf32, self.device)
        self.precision = speed.resolve_precision(config.precision, self.device)
        self.scaler = speed.grad_scaler(self.precision, self.device)
        if self.precision != "fp32":
            speed.keep_entropy_models_fp32(model)
        planned = (config.epochs - state.epoch) * steps_per_epoch
        if config.max_steps:
            planned = min(planned, config.max_steps - state.step)
        try:
            self.compiled = speed.use_compile(config.compile, self.device, planned,
                                              config.max_minutes - state.seconds / 60)
        except ValueError as err:
            raise ConfigError(str(err)) from None
        self.trace_logged = not self.compiled
        if self.compiled:
            self.ddp_model = speed.compile_module(self.ddp_model)
        log.info("speed switches: compile=%s, channels_last=%s, precision=%s, tf32=%s",
                 self.compiled, self.channels_last, self.precision,
                 config.tf32 and self.device.type == "cuda")
        # what ran, where a setting is "auto" (precision=auto is bf16 only on a GPU that has it)
        self.logger.set_tags({"precision_used": self.precision, "compiled": str(self.compiled)})

    def _log_rd_point(self, val_set) -> None:
        """Code the first rd_images validation images with real bitstreams; log test_*."""
        if not self.dist.is_main:
            return
        from taskcodec.evaluate import rd_point

        start = time.perf_counter()
        metrics = rd_point(self.model, self.model_args, val_set, self.config.rd_images)
        metrics["test_rd_seconds"] = time.perf_counter() - start
        self.logger.log_metrics(metrics, self.state.step)
        log.info("step %d: real bitstreams: test_bpp=%.4f, test_psnr=%.2f dB (%.1f s)",
                 self.state.step, metrics["test_bpp"], metrics["test_psnr"],
                 metrics["test_rd_seconds"])

    def _batches(self, train_set, remaining: int) -> Iterator[torch.Tensor]:
        state, config = self.state, self.config
        generator = torch.Generator().manual_seed(config.seed * 100_003 + state.epoch * 1_009
                                                  + state.epoch_step + 7_919 * self.dist.rank)
        loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True, drop_last=True,
                            generator=generator, num_workers=config.num_workers,
                            collate_fn=self.recipe.collate,
                            pin_memory=self.device.type == "cuda",
                            persistent_workers=False)
        if hasattr(train_set, "set_epoch"):
            train_set.set_epoch(state.epoch)
        for i, batch in enumerate(loader):
            if i >= remaining:
                break
            yield batch

    def _train_epoch(self, train_set, steps_per_epoch: int) -> bool:
        """Train until the epoch ends; True when the step budget is used up."""
        from tqdm import tqdm

        config, state = self.config, self.state
        model, optimizer, aux_optimizer = self.model, self.optimizer, self.aux_optimizer
        remaining = steps_per_epoch - state.epoch_step
        bar = tqdm(total=steps_per_epoch, initial=state.epoch_step, disable=not progress_enabled(),
                   desc=f"epoch {state.epoch + 1}/{config.epochs}", unit="step", leave=False)
        trainable = self.recipe.trainable(model)
        scaler = self.scaler
        started = time.perf_counter() - state.seconds
        for batch in self._batches(train_set, remaining):
            step_start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            aux_optimizer.zero_grad(set_to_none=True)
            if self.channels_last:
                batch = speed.channels_last(batch)
            if config.lr_scheduler == "warmup-cosine":
                self._set_lr(started)
            with speed.autocast(self.precision, self.device):
                losses = self.recipe.losses(self.ddp_model, batch, self.device)
            loss = losses["loss"]
            if not torch.isfinite(loss):
                weights = " or ".join(f"{k}={getattr(config, k)}" for k in ("lmbda", "alpha", "beta")
                                      if hasattr(config, k))
                # .item(): float() of a tensor that requires grad adds a warning to the output
                saved = (f"; the last good checkpoint is in {self.ckpt_dir}"
                         if (self.ckpt_dir / "last.pt").is_file() else "")
                raise TrainingError(
                    f"loss became {loss.item()} at step {state.step + 1} (epoch {state.epoch + 1}); "
                    f"lower lr={config.lr} or {weights}, or check the data{saved}")
            if scaler is not None:  # fp16: scale the loss so small gradients do not underflow
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)
            else:
                loss.backward()
            if config.clip_max_norm > 0:
                for group in self.recipe.clip_groups(trainable):
                    nn.utils.clip_grad_norm_(group, config.clip_max_norm)
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            if not self.trace_logged:
                self.trace_logged = True  # the first compiled step includes the trace
                trace = time.perf_counter() - step_start
                log.info("torch.compile: first step (trace included) took %.1f s", trace)
                self.logger.log_metrics({"compile_seconds": trace}, state.step + 1)
            aux = model.aux_loss()
            aux.backward()
            distributed.sync_grads(self.aux_params, self.dist)
            aux_optimizer.step()
            state.step += 1
            state.epoch_step += 1
            state.seconds = time.perf_counter() - started
            bar.update(1)
            if state.step % config.log_every == 0 or state.epoch_step == steps_per_epoch:
                items = _loss_items(losses)
                items["aux_loss"] = float(aux.detach())
                items["lr"] = optimizer.param_groups[0]["lr"]
                items["epoch"] = state.epoch
                self.logger.log_metrics(items, state.step)
                bar.set_postfix(loss=f"{items['loss']:.3f}", bpp=f"{items['bpp_loss']:.3f}")
            if distributed.any_rank(signals.received is not None, self.dist):
                bar.close()
                self._checkpoint("last")
                self.logger.set_tags({"preempted_at_step": str(state.step)})
                name = signals.name()
                log.warning("%s received: checkpoint written at step %d; exiting with status %d "
                            "so the job can be requeued", name, state.step, PREEMPTED_EXIT)
                raise _Preempted(name)
            if config.checkpoint_every and state.step % config.checkpoint_every == 0:
                self._checkpoint("last")
            if _budget_used(config, state, steps_only=True):
                bar.close()
                return True
        bar.close()
        return False

    def _set_lr(self, started: float) -> None:
        config, state = self.config, self.state
        total = config.max_steps or config.epochs * max(1, self.steps_per_epoch)
        progress = state.step / total
        if config.max_minutes:
            progress = max(progress, (time.perf_counter() - started) / (60 * config.max_minutes))
        for group in self.optimizer.param_groups:
            group["lr"] = config.lr * _warmup_cosine(config, state.step, progress)

    def _validate_and_schedule(self, val_set) -> bool:
        """Validate, step the schedule, keep the best checkpoint; True means stop early."""
        config, state = self.config, self.state
        metrics = None
        if self.dist.is_main:  # one rank validates; the others follow its numbers
            self.model.eval()
            try:
                metrics = self.recipe.validate(self.model, val_set, self.device)
            finally:
                self.model.train()
        metrics = distributed.broadcast(metrics, self.dist)
        state.history.append(metrics)
        monitor = self.recipe.monitor
        if monitor not in metrics:
            raise ConfigError(f"monitor={monitor} is not measured by this run "
                              f"(it measures: {', '.join(sorted(metrics))})")
        value = metrics[monitor]
        self.logger.log_metrics({**metrics, "epoch": state.epoch}, state.step)
        if self.dist.is_main:
            log.info("step %d: %s", state.step,
                     ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))
        if isinstance(self.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            self.scheduler.step(value)
        elif self.scheduler is not None:
            self.scheduler.step()
        sign = 1 if higher_is_better(monitor) else -1
        if state.best is None or sign * (value - state.best) > 0:
            state.best = value
            state.bad_validations = 0
            self._checkpoint("best")
        else:
            state.bad_validations += 1
        return bool(config.early_stop_patience) and state.bad_validations >= config.early_stop_patience

    def _checkpoint(self, name: str) -> None:
        from taskcodec.bitstream import checkpoint_fingerprint

        if not self.dist.is_main:
            return

        state = self.state
        model_state = {k: v.detach().cpu().contiguous() for k, v in self.model.state_dict().items()}
        ckpt = {
            "format": checkpoints.FORMAT,
            "taskcodec_version": _version(),
            "codec": self.model_args.get("codec", self.model_args.get("kind")),
            "entry_point": self.config.entry_point,
            "model_args": self.model_args,
            "config": self.config.to_dict(),
            "model": model_state,
            "fingerprint": checkpoint_fingerprint(model_state),
            "optimizer": self.optimizer.state_dict(),
            "aux_optimizer": self.aux_optimizer.state_dict(),
            "lr_scheduler": self.scheduler.state_dict() if self.scheduler is not None else {},
            "epoch": state.epoch, "epoch_step": state.epoch_step, "step": state.step,
            "best": state.best, "bad_validations": state.bad_validations,
            "seconds": state.seconds,
            "run_id": self.run_id,
            "unsent_metrics": self.logger.unsent_metrics(),
        }
        if ckpt["model_args"].get("kind", "codec") == "codec":
            ckpt["state_dict"] = model_state  # for CompressAI's eval_model; the same tensors
        path = checkpoints.save_atomic(ckpt, self.ckpt_dir / f"{name}.pt")
        # Upload a snapshot: the local file is replaced by the next save while the upload runs.
        staging = self.ckpt_dir / ".upload" / f"{name}-{state.step}-{time.monotonic_ns()}"
        staging.mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, staging / path.name)
        self.logger.log_artifact(staging / path.name, checkpoints.ARTIFACT_DIR, remove_after=True)


def _budget_used(config: LoopConfig, state: TrainState, steps_only: bool = False) -> str:
    """Why a run whose loop state is ``state`` has nothing left to train ('' if it has);
    ``steps_only``: the step and time budgets only (inside an epoch)."""
    if config.max_steps and state.step >= config.max_steps:
        return f"step {state.step} of max_steps={config.max_steps}"
    if config.max_minutes and state.seconds >= 60 * config.max_minutes:
        return f"{state.seconds / 60:.1f} minutes of max_minutes={config.max_minutes}"
    if steps_only:
        return ""
    if state.epoch >= config.epochs:
        return f"epoch {state.epoch} of epochs={config.epochs}"
    if config.early_stop_patience and state.bad_validations >= config.early_stop_patience:
        return f"stopped early after {state.bad_validations} validations without improvement"
    return ""


def _version() -> str:
    from taskcodec import __version__

    return __version__


def init_weights(model: nn.Module, ref: str, ckpt: dict | None = None) -> None:
    """Load another run's (or file's) weights to fine-tune from them (e.g. a new lmbda)."""
    if ckpt is None:
        ckpt, _ = checkpoints.load_ref(ref, "best")
    try:
        model.load_state_dict(ckpt["model"])
    except RuntimeError as err:
        stored = ckpt["config"]
        raise CheckpointError(
            f"init_from={ref}: its weights are a {stored.get('codec')} with N={stored.get('N')}, "
            f"M={stored.get('M')} and do not fit this codec ({str(err).splitlines()[0][:120]})"
        ) from None


def train(config: LoopConfig) -> str:
    """Train what the config describes as one MLflow run; returns the run id."""
    return Trainer(config).run()


def is_preemption(err: BaseException) -> bool:
    return isinstance(err, _Preempted)


