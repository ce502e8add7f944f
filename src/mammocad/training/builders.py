"""Turn a validated ``TrainConfig`` into the objects the engine runs: seeds, AMP choice, the loader
over the task's dataset, models per stage, loss, optimizer, LR schedule, early stopping. What
depends on the task (datasets, validation) is in the task module (``mammocad.tasks``).

Every ConfigError raised while building a section is re-raised naming the YAML file and the key
(``config_errors``), so a wrong fraction or model argument reads like a config mistake.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from mammocad.datasets.targets import IGNORE_INDEX
from mammocad.errors import ConfigError
from mammocad.sampling import item_seed
from mammocad.tasks import get_task
from mammocad.training.config import OptimConfig, StageConfig, TrainConfig, config_errors
from mammocad.training.distributed import DistContext


# ---- reproducibility ---------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def determinism_flags() -> tuple[Any, ...]:
    """torch's global determinism settings, to restore them after a run."""
    return (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled(),
            torch.utils.deterministic.fill_uninitialized_memory, torch.backends.cudnn.deterministic,
            torch.backends.cudnn.benchmark)


def restore_determinism_flags(flags: tuple[Any, ...]) -> None:
    torch.use_deterministic_algorithms(flags[0], warn_only=flags[1])
    torch.utils.deterministic.fill_uninitialized_memory = flags[2]
    torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = flags[3], flags[4]


def set_deterministic(enabled: bool, device: torch.device) -> None:
    """Deterministic kernels where torch has them (a warning, not an error, where it has none:
    e.g. CUDA bilinear-upsampling backward)."""
    if device.type == "cuda" and enabled:
        import os

        # cuBLAS reads this when it initialises; without it deterministic CUDA matmuls raise.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    # Deterministic mode also NaN-fills every torch.empty (a debugging aid against reading
    # uninitialised memory); our kernels never read it, and the fill cost ~10 % of CPU throughput.
    torch.utils.deterministic.fill_uninitialized_memory = False
    torch.backends.cudnn.deterministic = enabled
    torch.backends.cudnn.benchmark = not enabled


def seed_epoch(seed: int, epoch: int, rank: int) -> None:
    """Global RNGs (dropout, ...) from (seed, epoch, rank): a resumed run continues exactly as an
    uninterrupted one without storing RNG states, and ranks draw different dropout masks."""
    s = item_seed(seed, epoch, 3, rank)
    random.seed(s)
    np.random.seed(s % 2**32)
    torch.manual_seed(s)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: numpy/random seeded from torch's per-worker seed (the
    PyTorch recipe). Patches themselves are seeded per item by ``PatchDataset``."""
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def resolve_amp(amp: str, device: torch.device, source: str) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler). ``auto``: bf16 where the device computes it
    natively (CUDA with bf16, AVX512-BF16/AMX CPUs), fp16 + GradScaler on older GPUs, else fp32."""
    from mammocad.devices import cpu_supports_bf16

    if amp == "none":
        return None, False
    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        if amp == "bf16" and not bf16:
            raise ConfigError(source, "train.amp: bf16 is not supported by this GPU; use fp16 or none")
        if amp == "fp16" or (amp == "auto" and not bf16):
            return torch.float16, True
        return torch.bfloat16, False
    if amp == "fp16":
        raise ConfigError(source, "train.amp: fp16 autocast needs a CUDA device; use bf16 or none on a CPU")
    native = cpu_supports_bf16()
    if amp == "bf16" and not native:
        raise ConfigError(source, "train.amp: this CPU has no native bf16 (AVX512-BF16 or AMX); use none")
    return (torch.bfloat16 if native else None), False


# ---- data ----------------------------------------------------------------------------------------
def make_loader(dataset: torch.utils.data.Dataset, cfg: TrainConfig, ctx: DistContext, shuffle: bool = True,
                collate: Any = None) -> tuple[torch.utils.data.DataLoader, torch.utils.data.Sampler]:
    """A loader over this rank's shard. ``DistributedSampler`` is used in every run (with one
    replica it is a seeded shuffle), so 1 and N processes run the same code; call its
    ``set_epoch`` and the dataset's before each epoch."""
    from torch.utils.data import DataLoader, DistributedSampler

    sampler = DistributedSampler(dataset, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=shuffle,
                                 seed=cfg.train.seed, drop_last=False)
    workers = cfg.sampling.workers
    loader = DataLoader(dataset, batch_size=cfg.sampling.batch_size, sampler=sampler, num_workers=workers,
                        pin_memory=ctx.device.type == "cuda", worker_init_fn=seed_worker if workers else None,
                        generator=torch.Generator().manual_seed(cfg.train.seed), drop_last=False,
                        collate_fn=collate)
    return loader, sampler


# ---- models and stages -------------------------------------------------------------------------
def build_base_model(cfg: TrainConfig) -> nn.Module:
    """The configured architecture, optionally initialised from a bundle (``model.init_from``)."""
    from mammocad.models import create_model

    kwargs = {**cfg.model.kwargs, "num_classes": get_task(cfg.task, cfg.source).model_outputs(cfg)}
    init = None
    if cfg.model.init_from is not None:
        from mammocad.models.bundle import load_bundle

        init, card = load_bundle(cfg.model.init_from)
        if card.task != cfg.task:
            raise ConfigError(cfg.source, f"model.init_from: {card.name} is a {card.task} model; this config trains "
                                          f"{cfg.task} models")
    with config_errors(cfg, "model.kwargs"):
        if init is not None and init.mammocad_config["name"] != cfg.model.name:
            return create_model(cfg.model.name, **kwargs, init_from=init)  # e.g. FCN-16s from a trained FCN-32s
        model = create_model(cfg.model.name, **kwargs)
    if init is not None:
        try:
            model.load_state_dict(init.state_dict(), strict=True)
        except RuntimeError as exc:
            raise ConfigError(cfg.source, f"model.init_from: bundle weights do not fit model.kwargs "
                                          f"({str(exc).splitlines()[0]})") from None
    return model


def switch_model(cfg: TrainConfig, stage: StageConfig, previous: nn.Module) -> nn.Module:
    """The stage's architecture initialised from ``previous`` (FCN-32s -> 16s -> 8s), or ``previous``."""
    from mammocad.models import create_model

    if stage.model is None or stage.model == previous.mammocad_config["name"]:
        return previous
    kwargs = {**cfg.model.kwargs, "num_classes": get_task(cfg.task, cfg.source).model_outputs(cfg)}
    with config_errors(cfg, f"train.stages.{stage.name}.model"):
        return create_model(stage.model, **kwargs, init_from=previous)


def apply_stage(cfg: TrainConfig, model: nn.Module, stage: StageConfig) -> None:
    """Trainable parameters for ``stage``: all, then ``set_stage`` (Dilation10), then ``freeze`` prefixes;
    parameters the model declares fixed (``fixed_parameter_names``) are never made trainable."""
    from mammocad.models.registry import fixed_parameter_names

    model.requires_grad_(True)
    where = f"train.stages.{stage.name}"
    if stage.model_stage is not None:
        if not hasattr(model, "set_stage"):
            raise ConfigError(cfg.source, f"{where}.model_stage: model {model.mammocad_config['name']} has no stages")
        with config_errors(cfg, f"{where}.model_stage"):
            model.set_stage(stage.model_stage)
    names = [n for n, _ in model.named_parameters()]
    for prefix in stage.freeze:
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            raise ConfigError(cfg.source, f"{where}.freeze: {prefix!r} matches no parameter (e.g. {names[0]!r})")
        for name, p in model.named_parameters():
            if name in hits:
                p.requires_grad_(False)
    fixed = fixed_parameter_names(model)
    for name, p in model.named_parameters():
        if name in fixed:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError(cfg.source, f"{where}: every parameter is frozen; nothing to train")


# ---- optimisation ------------------------------------------------------------------------------
def build_optimizer(optim: OptimConfig, model: nn.Module, lr: float | None = None) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    lr = optim.lr if lr is None else lr
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=optim.momentum, weight_decay=optim.weight_decay,
                               nesterov=optim.nesterov and optim.momentum > 0)
    return torch.optim.AdamW(params, lr=lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def build_scheduler(optim: OptimConfig, optimizer: torch.optim.Optimizer, epochs: int) -> Any:
    """Per-epoch LR schedule (``step()`` once after each epoch): ``step`` = x gamma every ``every``
    epochs (the papers' piecewise decay x0.3 every 10 epochs), ``cosine`` to ``min_lr`` over the
    stage, ``none`` = constant (None)."""
    sch = optim.schedule
    if sch.kind == "step":
        return torch.optim.lr_scheduler.StepLR(optimizer, step_size=sch.every, gamma=sch.gamma)
    if sch.kind == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, epochs), eta_min=sch.min_lr)
    return None


def build_loss(cfg: TrainConfig) -> nn.Module:
    from mammocad.training.losses import create_loss

    # targets mark unscored pixels (unknown pathology, padding) with IGNORE_INDEX: every loss must skip them
    kwargs = {"ignore_index": IGNORE_INDEX, **cfg.loss.kwargs}
    with config_errors(cfg, "loss"):
        return create_loss(cfg.loss.name, **kwargs)


@dataclass
class EarlyStopping:
    """Stop a stage after ``patience`` validations without an improvement > ``min_delta`` of val Dice."""

    patience: int | None
    min_delta: float = 0.0
    best: float = -math.inf
    best_epoch: int | None = None
    bad: int = 0

    def update(self, score: float, epoch: int) -> bool:
        """Record a validation; True when it is the best so far."""
        if math.isfinite(score) and (self.best_epoch is None or score > self.best + self.min_delta):
            self.best, self.best_epoch, self.bad = float(score), int(epoch), 0
            return True
        self.bad += 1
        return False

    @property
    def should_stop(self) -> bool:
        return self.patience is not None and self.bad >= self.patience

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["best"] = None if not math.isfinite(self.best) else self.best
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any], patience: int | None) -> "EarlyStopping":
        best = -math.inf if d.get("best") is None else float(d["best"])
        return cls(patience=patience, min_delta=float(d.get("min_delta", 0.0)), best=best,
                   best_epoch=d.get("best_epoch"), bad=int(d.get("bad", 0)))
