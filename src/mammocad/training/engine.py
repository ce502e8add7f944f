"""The training loop: ``train(cfg, out_dir)`` -> a model bundle, logs and resumable checkpoints.

Task-agnostic: the config's ``task`` picks a task module (``mammocad.tasks``) that supplies the
dataset, the train step (a loss dict), validation and the final report; this module keeps epochs,
stages, DDP, resume, early stopping and the files of a run.

One code path for 1 process and for ``torchrun --nproc_per_node=N`` (DDP, see ``distributed``):
the patch indices of an epoch are sharded by ``DistributedSampler`` (a seeded shuffle with one
process), gradients are averaged by DDP, losses and patch counts are all-reduced, validation and
every file write happen on rank 0 and the decisions (early stopping, time budget) are broadcast.

Run folder::

    OUT/config.yaml, run_info.json         the resolved config; device, world size, shards
    OUT/log.csv, tensorboard/, curves_*.png   per-epoch logs
    OUT/checkpoint.safetensors + .json     resume state after the last finished epoch (no pickle)
    OUT/best.safetensors                   weights of the best validation of the current stage
    OUT/validation/                        final validation report (JSON + Markdown)
    OUT/bundle/model.safetensors + model.json   the trained model and its card

Stages (``train.stages``) run in order; each gets a fresh optimizer, LR schedule and early
stopping, and starts from the previous stage's best weights (FCN-32s -> 16s -> 8s; Dilation10
front -> context -> global). Determinism: the global RNGs are re-seeded from (seed, epoch, rank) at
every epoch and patches are seeded per item, so a resumed run ends with the same weights as an
uninterrupted one.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from torch import nn

from mammocad.errors import ConfigError, MammocadError
from mammocad.io.atomic import atomic_write_json, atomic_write_text
from mammocad.tasks import RunContext, ValidationResult, get_task
from mammocad.training import builders as B
from mammocad.training.checkpoint import (BEST_WEIGHTS, join_optimizer_state, load_checkpoint_tensors, load_weights,
                                          read_checkpoint_state, save_checkpoint, save_weights)
from mammocad.training.config import TrainConfig, resume_key
from mammocad.training.distributed import (DistContext, all_reduce_sum, barrier, broadcast_from_main, gather_objects,
                                           init_distributed, shutdown)
from mammocad.training.logs import TrainingLog

BUNDLE_DIR = "bundle"


@dataclass
class TrainResult:
    out_dir: Path
    bundle_dir: Path | None  # None when the run was interrupted (resume it) or trained no epoch
    epochs: int  # epochs finished, over all runs of this folder
    stopped: str  # completed | early_stopping | time_budget | interrupted
    best_val_dice: float | None
    history: list[dict[str, Any]] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)  # seconds: setup, epochs (+ CPU time), validation, final
    model: nn.Module | None = None  # the trained model in memory (what the bundle holds), eval mode, CPU


def train(cfg: TrainConfig, out_dir: str | Path, *, resume: bool = False, device: str = "auto",
          stop_after_epochs: int | None = None, progress: bool = True) -> TrainResult:
    """Train as ``cfg`` says into ``out_dir``. ``resume`` continues from its checkpoint;
    ``stop_after_epochs`` stops this run after that many epochs as if killed (then resume)."""
    ctx = init_distributed(device)
    flags, threads = B.determinism_flags(), torch.get_num_threads()
    try:
        return Trainer(cfg, Path(out_dir), ctx, progress).run(resume, stop_after_epochs)
    finally:  # leave the calling process as it was (tests, notebooks)
        B.restore_determinism_flags(flags)
        torch.set_num_threads(threads)
        shutdown(ctx)


def train_one_epoch(net: nn.Module, loader: Any, optimizer: torch.optim.Optimizer, task: Any, device: torch.device,
                    scaler: Any, grad_clip: float | None,
                    on_step: Callable[[torch.Tensor, int], None] | None = None) -> tuple[float, int]:
    """One pass over ``loader``: (sum of per-item losses, items). ``task.train_step`` gives the loss
    dict of a batch (its ``"loss"`` is optimised); the loss stays a device tensor until the end (no
    per-step host sync)."""
    net.train()
    params = [p for p in net.parameters() if p.requires_grad]
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    n = 0
    for batch in loader:
        loss = task.train_step(net, batch)["loss"]
        items = task.batch_items(batch)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if grad_clip:
                scaler.unscale_(optimizer)
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if grad_clip:
                torch.nn.utils.clip_grad_norm_(params, grad_clip)
            optimizer.step()
        loss_sum += loss.detach().double() * items
        n += items
        if on_step is not None:
            on_step(loss_sum, n)
    return float(loss_sum), n


class Trainer:
    def __init__(self, cfg: TrainConfig, out_dir: Path, ctx: DistContext, progress: bool = True):
        from rich.console import Console

        self.cfg, self.out, self.ctx = cfg, out_dir, ctx
        self.console = Console(stderr=True, quiet=not ctx.is_main)
        self.progress = progress and ctx.is_main
        self.timings = {"setup": 0.0, "epochs": 0.0, "epochs_cpu": 0.0, "validation": 0.0, "final": 0.0}
        self.run_info_written = False

    # ---- setup ---------------------------------------------------------------------------------
    def _setup(self, resume: bool) -> None:
        from mammocad.datasets.prepared import PreparedDataset

        cfg, ctx = self.cfg, self.ctx
        state = read_checkpoint_state(self.out)
        if state is not None and not resume:
            raise ConfigError(self.out, "holds a checkpoint of an earlier run; pass --resume to continue it or "
                                        "choose another --out")
        if state is not None:  # checkpoints written before the config had a task were all segmentation
            old, new = {"task": "segment", **state.get("config_key", {})}, resume_key(cfg)
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            if diff:
                raise ConfigError(cfg.source, f"{diff[0]}: differs from the config of the checkpoint in {self.out}; "
                                              "resume with the same config or start a new --out")
        if state is None and resume:
            self.console.print(f"mammocad: no checkpoint in {self.out}; starting a fresh run", markup=False)
        self.state = state
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        B.set_deterministic(cfg.train.deterministic, ctx.device)
        self.amp_dtype, use_scaler = B.resolve_amp(cfg.train.amp, ctx.device, cfg.source)
        self.make_scaler = (lambda: torch.amp.GradScaler(ctx.device.type)) if use_scaler else (lambda: None)
        if not cfg.data.prepared.is_dir():
            raise ConfigError(cfg.source, f"data.prepared: {cfg.data.prepared} is not a folder")
        self.prepared = PreparedDataset(cfg.data.prepared)
        run = RunContext(device=ctx.device, rank=ctx.rank, world_size=ctx.world_size, amp_dtype=self.amp_dtype,
                         all_reduce_sum=lambda values: all_reduce_sum(ctx, values))
        self.task = get_task(cfg.task, cfg.source).training(cfg, self.prepared, run, B.build_loss(cfg).to(ctx.device))
        self.dataset = self.task.train_dataset
        self.loader, self.sampler = B.make_loader(self.dataset, cfg, ctx, collate=self.task.collate)
        import safetensors.torch  # noqa: F401  (imported here, not inside the first epoch's timing)
        self.task.prepare_validation(patch_loader=cfg.train.val_mode == "patch" and cfg.train.val_every > 0)
        if ctx.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.out / "config.yaml", yaml.safe_dump(cfg.to_json(), sort_keys=False))
        self.log = TrainingLog(self.out, (state or {}).get("history"), enabled=ctx.is_main,
                               tensorboard=cfg.train.tensorboard)

    def _write_run_info(self, epoch: int) -> None:
        shard = list(iter(self.sampler))
        shards = gather_objects(self.ctx, {"rank": self.ctx.rank, "n": len(shard), "first": shard[:16]})
        if self.ctx.is_main:
            info = {"world_size": self.ctx.world_size, "backend": self.ctx.backend, "device": str(self.ctx.device),
                    "amp": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
                    "threads": torch.get_num_threads(), "torch": torch.__version__, "first_epoch": epoch,
                    "patches_per_epoch": len(self.dataset), "shards": shards}
            atomic_write_json(self.out / "run_info.json", info, indent=1)

    # ---- validation ----------------------------------------------------------------------------
    def _validate(self, model: nn.Module) -> ValidationResult:
        """The task's validation; its score broadcast from rank 0, so every rank decides alike."""
        result = self.task.validate(model)
        result.score = broadcast_from_main(self.ctx, [result.score])[0]
        return result

    # ---- the run -------------------------------------------------------------------------------
    def run(self, resume: bool, stop_after_epochs: int | None) -> TrainResult:
        start = time.monotonic()
        self._setup(resume)
        cfg, ctx, st = self.cfg, self.ctx, self.state
        stages = cfg.stage_list()
        si0 = int(st["stage_index"]) if st else 0
        if si0 >= len(stages):
            raise ConfigError(cfg.source, f"train.stages: the checkpoint is at stage {si0 + 1}, the config has "
                                          f"{len(stages)}")
        B.seed_everything(cfg.train.seed)
        model = B.build_base_model(cfg)
        for stage in stages[: si0 + 1]:
            model = B.switch_model(cfg, stage, model)
        epoch = int(st["epoch"]) if st else 0
        stage_results: list[dict[str, Any]] = list(st.get("stage_results", [])) if st else []
        run_seconds = float(st.get("run_seconds", 0.0)) if st else 0.0
        stopped, epochs_this_run, epoch_times = "completed", 0, []
        self.timings["setup"] = time.monotonic() - start
        amp = str(self.amp_dtype or "none").removeprefix("torch.")
        self.console.print(f"mammocad: training {cfg.model.name} on {len(self.dataset)} patches/epoch, "
                           f"{ctx.world_size} process(es) on {ctx.device}, amp={amp}"
                           + (f", resuming after epoch {epoch}" if st else ""), markup=False, highlight=False)
        from rich.progress import TextColumn

        from mammocad.console import progress_bar

        bar = progress_bar(self.console, self.progress, remaining=False, extra=[TextColumn("{task.fields[info]}")])
        with bar:
            for si in range(si0, len(stages)):
                stage = stages[si]
                resuming = st is not None and si == si0
                if si > si0:
                    model = B.switch_model(cfg, stage, model)
                B.apply_stage(cfg, model, stage)
                self.task.check_model(model)
                model.to(ctx.device)
                optimizer = B.build_optimizer(cfg.optim, model, stage.lr)
                scheduler = B.build_scheduler(cfg.optim, optimizer, stage.epochs)
                scaler = self.make_scaler()
                early = B.EarlyStopping(cfg.train.patience, cfg.train.min_delta)
                stage_epoch, best_state = 0, None  # best_state: CPU copy of this stage's best weights, every rank
                if resuming:
                    model_state, opt_tensors = load_checkpoint_tensors(self.out, epoch)
                    model.load_state_dict(model_state, strict=True)
                    optimizer.load_state_dict(join_optimizer_state(opt_tensors, st["optimizer"]))
                    if scheduler is not None and st.get("scheduler"):
                        scheduler.load_state_dict(st["scheduler"])
                    if scaler is not None and st.get("scaler"):
                        scaler.load_state_dict(st["scaler"])
                    early = B.EarlyStopping.from_dict(st["early"], cfg.train.patience)
                    stage_epoch = int(st["stage_epoch"])
                    if early.best_epoch is not None and (self.out / BEST_WEIGHTS).is_file():
                        best_state = self._read_best(model)
                net = self._wrap(model)
                while stage_epoch < stage.epochs and not early.should_stop:
                    budget = cfg.train.max_minutes
                    mean_epoch = sum(epoch_times) / len(epoch_times) if epoch_times else 0.0
                    over = budget is not None and time.monotonic() - start + mean_epoch > budget * 60
                    if broadcast_from_main(ctx, [float(over)])[0]:
                        stopped = "time_budget"
                        break
                    if stop_after_epochs is not None and epochs_this_run >= stop_after_epochs:
                        stopped = "interrupted"
                        break
                    t_epoch, cpu_epoch = time.monotonic(), time.process_time()
                    epoch, stage_epoch, epochs_this_run = epoch + 1, stage_epoch + 1, epochs_this_run + 1
                    row, improved = self._epoch(net, model, optimizer, scheduler, scaler, early, stage, stage_epoch,
                                                epoch, bar)
                    if improved:
                        best_state = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                        if ctx.is_main:
                            save_weights(self.out / BEST_WEIGHTS, model, {"epoch": str(epoch), "stage": stage.name})
                    run_seconds += time.monotonic() - t_epoch
                    if ctx.is_main:
                        self.log.add(row)
                        save_checkpoint(self.out, model, optimizer, {
                            "epoch": epoch, "stage_index": si, "stage": stage.name, "stage_epoch": stage_epoch,
                            "early": early.to_dict(), "scheduler": scheduler.state_dict() if scheduler else None,
                            "scaler": scaler.state_dict() if scaler else None, "history": self.log.history,
                            "stage_results": stage_results, "config_key": resume_key(cfg), "run_seconds": run_seconds,
                            "world_size": ctx.world_size})
                    else:
                        self.log.history.append(row)
                    epoch_times.append(time.monotonic() - t_epoch)
                    self.timings["epochs"] += epoch_times[-1]
                    self.timings["epochs_cpu"] += time.process_time() - cpu_epoch
                if stopped == "interrupted":
                    break
                if best_state is not None:  # the next stage (and the bundle) start from this stage's best
                    model.load_state_dict(best_state)
                stage_results.append({"stage": stage.name, "architecture": model.mammocad_config["name"],
                                      "epochs": stage_epoch, "best_epoch": early.best_epoch,
                                      "best_val_dice": early.to_dict()["best"], "early_stopped": early.should_stop})
                if stopped == "time_budget":
                    break
        if stopped == "completed" and any(r["early_stopped"] for r in stage_results[-1:]):
            stopped = "early_stopping"
        best = stage_results[-1]["best_val_dice"] if stage_results else None
        self.log.close()
        result = TrainResult(self.out, None, epoch, stopped, best, self.log.history, self.timings, model)
        if stopped != "interrupted" and epoch > 0:
            result.bundle_dir = self._finish(model, stage_results, stopped, epoch, run_seconds)
        elif stopped == "time_budget":
            self.console.print("mammocad: the time budget was spent before the first epoch; no bundle written")
        barrier(ctx)
        return result

    def _wrap(self, model: nn.Module) -> nn.Module:
        if not self.ctx.active:
            return model
        from torch.nn.parallel import DistributedDataParallel

        ids = [self.ctx.device.index] if self.ctx.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def _read_best(self, model: nn.Module) -> dict[str, torch.Tensor]:
        current = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        load_weights(self.out / BEST_WEIGHTS, model)
        best = {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
        model.load_state_dict(current)
        return best

    def _epoch(self, net, model, optimizer, scheduler, scaler, early, stage, stage_epoch, epoch,
               bar) -> tuple[dict, bool]:
        cfg, ctx = self.cfg, self.ctx
        B.seed_epoch(cfg.train.seed, epoch, ctx.rank)
        self.dataset.set_epoch(epoch)
        self.sampler.set_epoch(epoch)
        if not self.run_info_written:  # a collective: every rank takes this branch at the same epoch
            self._write_run_info(epoch)
            self.run_info_written = True
        total = sum(s.epochs for s in cfg.stage_list())
        task = bar.add_task(f"epoch {epoch}/{total} {stage.name}", total=len(self.loader), info="")

        def on_step(loss_sum: torch.Tensor, n: int) -> None:
            bar.advance(task)
            if not bar.disable and n % (10 * cfg.sampling.batch_size) < cfg.sampling.batch_size:
                bar.update(task, info=f"loss {float(loss_sum) / n:.4f}")

        lr = optimizer.param_groups[0]["lr"]
        t0 = time.perf_counter()
        loss_sum, n = train_one_epoch(net, self.loader, optimizer, self.task, ctx.device, scaler, cfg.optim.grad_clip,
                                      on_step)
        train_seconds = time.perf_counter() - t0
        loss_sum, n_all = all_reduce_sum(ctx, [loss_sum, float(n)])
        train_loss = loss_sum / max(n_all, 1.0)
        if not math.isfinite(train_loss):
            raise MammocadError(cfg.source, f"optim.lr: training diverged (loss {train_loss} at epoch {epoch}); "
                                            "lower the learning rate or enable optim.grad_clip")
        if scheduler is not None:
            scheduler.step()
        row: dict[str, Any] = {"epoch": epoch, "stage": stage.name, "lr": lr, "train_loss": train_loss,
                               "patches": int(n_all), "train_seconds": round(train_seconds, 3),
                               "patches_per_s": round(n_all / train_seconds, 2) if train_seconds > 0 else None}
        improved, shown = False, ""
        if cfg.train.val_every and (stage_epoch % cfg.train.val_every == 0 or stage_epoch == stage.epochs):
            val = self._validate(model)
            self.timings["validation"] += val.seconds
            improved = early.update(val.score, epoch)
            row.update({k: v for k, v in val.metrics.items() if k in self.task.log_metrics})
            row["val_seconds"] = round(val.seconds, 3)
            shown = f" val {self.task.score_name} {val.score:.4f}" if math.isfinite(val.score) else ""
        # the log column keeps its historical name; it is the task's monitored score (segment: Dice)
        row["best_val_dice"] = early.to_dict()["best"]
        row["epoch_seconds"] = round(time.perf_counter() - t0, 3)
        bar.update(task, info=f"loss {train_loss:.4f} " + shown)
        if bar.disable:
            self.console.print(f"epoch {epoch}/{total} [{stage.name}] loss {train_loss:.4f} lr {lr:.3g} "
                               f"{row['patches_per_s']} patches/s" + shown, markup=False, highlight=False)
        return row, improved

    # ---- the end -------------------------------------------------------------------------------
    def _finish(self, model: nn.Module, stage_results: list[dict], stopped: str, epoch: int,
                run_seconds: float) -> Path | None:
        """Final validation with bootstrap CIs (the task's), report and bundle (rank 0)."""
        from mammocad.models.bundle import save_bundle
        from mammocad.training.card import build_card

        t0 = time.monotonic()
        if not self.ctx.is_main:
            return None
        report, line = self.task.final_validation(model, self.out / "validation", self.cfg.train.final_n_boot)
        if line:
            self.console.print(f"mammocad: {line}")
        training = {"epochs": epoch, "stopped": stopped, "complete": stopped in ("completed", "early_stopping"),
                    "stages": stage_results, "seconds": round(run_seconds, 1), "device": str(self.ctx.device),
                    "world_size": self.ctx.world_size,
                    "amp": None if self.amp_dtype is None else str(self.amp_dtype).removeprefix("torch."),
                    "seed": self.cfg.train.seed, "patches_per_epoch": len(self.dataset)}
        card = build_card(self.cfg, self.prepared, report=report, training=training)
        bundle = save_bundle(self.out / BUNDLE_DIR, model.cpu().eval(), card)
        self.timings["final"] = time.monotonic() - t0
        self.console.print(f"mammocad: bundle written to {bundle} ({stopped})")
        return bundle
