"""Training the translator on (features, caption) pairs with the LM frozen, resumable.

AdamW, linear warm-up then a cosine (or constant) learning rate, a validation split drawn from
the seed, early stopping on the validation loss with the best weights kept. On CUDA the LM runs
in float16 under autocast with a GradScaler (the users' V100s have no fast bfloat16); on the CPU
in float32.

A preempted job resumes: every `checkpoint_every` steps (and at the end) the whole training
state is written atomically to checkpoint_dir/checkpoint.pt: weights, optimiser, scheduler,
scaler, step, epoch and position in the epoch, best loss and weights, patience, loss history and
RNG states. Each epoch's order comes from a generator seeded by (seed, epoch), so a run resumed
mid-epoch sees the same batches, and reaches bit-identical weights to one never interrupted. A
checkpoint made from other inputs or settings is ignored (training starts over).
"""

from __future__ import annotations

import csv
import functools
import hashlib
import json
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neuroscribe.device import resolve_device, resolve_dtype
from neuroscribe.io import atomic_path, write_json
from neuroscribe.methods.texplain.lm import caption_batch, load_lm, prefix_loss
from neuroscribe.methods.texplain.sampling import derived_seed
from neuroscribe.methods.texplain.translator import (
    Translator,
    TranslatorSpec,
    build_translator,
    save_translator,
)

log = logging.getLogger(__name__)

CHECKPOINT = "checkpoint.pt"
SCHEDULES = ("cosine", "constant")
TRAIN, VALIDATION = "train", "validation"


@dataclass(frozen=True)
class TrainSettings:
    """How the translator trains. Steps count optimiser steps (batches)."""

    lr: float = 1e-3
    weight_decay: float = 0.01
    warmup_steps: int = 100
    schedule: str = "cosine"  # after warm-up: cosine decay to 0 at max_epochs, or constant
    batch_size: int = 64
    max_epochs: int = 10
    val_fraction: float = 0.1
    eval_every: int = 200
    patience: int = 5  # evaluations without a better validation loss before stopping
    checkpoint_every: int = 500
    seed: int = 0
    max_caption_tokens: int = 40

    def __post_init__(self) -> None:
        if self.schedule not in SCHEDULES:
            raise ValueError(f"schedule {self.schedule!r}; known: {', '.join(SCHEDULES)}")
        if not 0 < self.val_fraction < 1:
            raise ValueError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        for name in ("batch_size", "max_epochs", "eval_every", "patience", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrainSettings:
        return cls(**data)


@dataclass
class _Data:
    """Every example, on the CPU; batches move to the device as they are used."""

    features: torch.Tensor  # [N, F] as given (float16 stays float16 until a batch is taken)
    ids: torch.Tensor  # [N, T] caption ids + eos, right-padded
    mask: torch.Tensor  # [N, T]
    train: torch.Tensor  # indices of the training split
    val: torch.Tensor  # indices of the validation split


@dataclass
class _Progress:
    """Everything of a run that a checkpoint carries besides the torch objects' own states."""

    step: int = 0
    epoch: int = 0
    position: int = 0  # batches done in the current epoch
    best_loss: float = math.inf
    best_step: int = 0
    bad_evals: int = 0  # evaluations since the best one
    history: list[list[Any]] = field(default_factory=list)  # [step, split, loss]
    train_seconds: float = 0.0
    finished: bool = False
    stop_reason: str | None = None


@dataclass
class _Run:
    """The live objects of one training run."""

    lm: Any
    translator: Translator
    optimiser: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    device: torch.device
    amp: bool
    progress: _Progress
    best_state: dict[str, torch.Tensor]


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """The learning rate multiplier after `step` optimiser steps."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    done = (step - warmup) / max(1, total - warmup)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, done)))


def split_indices(n: int, val_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, validation) indices: a permutation drawn from the seed, its first part held out."""
    if n < 2:
        raise ValueError(f"training the translator needs at least 2 captioned images, got {n}")
    generator = torch.Generator().manual_seed(derived_seed(seed, "validation split"))
    order = torch.randperm(n, generator=generator)
    n_val = min(n - 1, max(1, round(n * val_fraction)))
    return order[n_val:].sort().values, order[:n_val].sort().values


def epoch_order(n: int, seed: int, epoch: int) -> torch.Tensor:
    """The order of the training examples in `epoch`, the same on every (re)run."""
    generator = torch.Generator().manual_seed(derived_seed(seed, "epoch", epoch))
    return torch.randperm(n, generator=generator)


def _fingerprint(features: np.ndarray, captions: Sequence[str], context: dict[str, Any]) -> str:
    """What the run's result depends on: a checkpoint is resumed only if this matches."""
    digest = hashlib.sha256()
    array = np.ascontiguousarray(features)
    digest.update(f"{array.dtype.str}{array.shape}".encode())
    digest.update(memoryview(array).cast("B"))
    digest.update(json.dumps(list(captions)).encode())
    digest.update(json.dumps(context, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _prepare_data(
    features: np.ndarray, captions: Sequence[str], tokenizer: Any, settings: TrainSettings
) -> _Data:
    if features.ndim != 2 or len(features) != len(captions):
        raise ValueError(
            f"features must be [images, features] with one caption per image; got features "
            f"{list(features.shape)} and {len(captions)} captions"
        )
    ids, mask = caption_batch(tokenizer, captions, settings.max_caption_tokens)
    train, val = split_indices(len(captions), settings.val_fraction, settings.seed)
    # no copy unless the array is read-only or strided (torch wants writable, contiguous memory)
    array = np.require(features, requirements=["C", "W"])
    return _Data(torch.from_numpy(array), ids, mask, train, val)


def _batch(
    data: _Data, rows: torch.Tensor, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Features, ids and mask of some examples, cut to the batch's longest caption."""
    mask = data.mask[rows]
    width = int(mask.sum(1).max())
    return (
        data.features[rows].to(device, torch.float32),
        data.ids[rows, :width].to(device),
        mask[:, :width].to(device),
    )


def _autocast(run: _Run) -> Any:
    return torch.autocast(device_type=run.device.type, dtype=torch.float16, enabled=run.amp)


def _train_step(run: _Run, data: _Data, rows: torch.Tensor) -> float:
    """One optimiser step on the examples `rows`; returns their loss."""
    features, ids, mask = _batch(data, rows, run.device)
    run.translator.train()
    with _autocast(run):
        loss = prefix_loss(run.lm, run.translator(features), ids, mask)
    if not run.amp and not torch.isfinite(loss):
        raise FloatingPointError(
            f"translator training loss is {float(loss)} at step {run.progress.step + 1}; "
            "lower texplain.train.lr"
        )
    run.optimiser.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()
    run.scaler.step(run.optimiser)  # skipped by the scaler when fp16 gradients overflowed
    run.scaler.update()
    run.scheduler.step()
    return float(loss.detach())


@torch.no_grad()
def _validation_loss(run: _Run, data: _Data, batch_size: int) -> float:
    """Mean cross-entropy per caption token over the whole validation split."""
    run.translator.eval()
    total, tokens = 0.0, 0
    for rows in data.val.split(batch_size):
        features, ids, mask = _batch(data, rows, run.device)
        with _autocast(run):
            loss = prefix_loss(run.lm, run.translator(features), ids, mask, reduction="sum")
        total += float(loss)
        tokens += int(mask.sum())
    return total / tokens


def _cpu_state(translator: Translator) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu().clone() for k, v in translator.state_dict().items()}


def _evaluate(run: _Run, data: _Data, settings: TrainSettings) -> bool:
    """Validation loss into the history, best weights kept; True when patience runs out."""
    progress = run.progress
    loss = _validation_loss(run, data, settings.batch_size)
    progress.history.append([progress.step, VALIDATION, loss])
    if loss < progress.best_loss:
        progress.best_loss, progress.best_step, progress.bad_evals = loss, progress.step, 0
        run.best_state = _cpu_state(run.translator)
    else:
        progress.bad_evals += 1
    recent = [h[2] for h in progress.history[-settings.eval_every - 1 :] if h[1] == TRAIN]
    log.info(
        "texplain translator step %d (epoch %d): train loss %s, validation loss %.4f "
        "(best %.4f at step %d)",
        progress.step,
        progress.epoch,
        f"{sum(recent) / len(recent):.4f}" if recent else "-",
        loss,
        progress.best_loss,
        progress.best_step,
    )
    return progress.bad_evals >= settings.patience


def _rng_states(device: torch.device) -> dict[str, Any]:
    states: dict[str, Any] = {"torch": torch.get_rng_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def _save_checkpoint(run: _Run, path: Path, fingerprint: str) -> None:
    state = {
        "fingerprint": fingerprint,
        "translator": _cpu_state(run.translator),
        "optimiser": run.optimiser.state_dict(),
        "scheduler": run.scheduler.state_dict(),
        "scaler": run.scaler.state_dict(),
        "progress": asdict(run.progress),
        "best_state": run.best_state,
        "rng": _rng_states(run.device),
    }
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def _load_checkpoint(path: Path, fingerprint: str) -> dict[str, Any] | None:
    """The checkpoint at `path` if there is one made from the same inputs and settings."""
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a truncated file cannot happen (atomic writes); a foreign one can
        log.warning("ignoring unreadable translator checkpoint %s: %s", path, exc)
        return None
    if state.get("fingerprint") != fingerprint:
        log.warning(
            "ignoring translator checkpoint %s: made from other features, captions or settings",
            path,
        )
        return None
    return state


def _restore(run: _Run, state: dict[str, Any]) -> None:
    run.translator.load_state_dict(state["translator"])
    run.optimiser.load_state_dict(state["optimiser"])
    run.scheduler.load_state_dict(state["scheduler"])
    run.scaler.load_state_dict(state["scaler"])
    run.progress = _Progress(**state["progress"])
    run.best_state = state["best_state"]
    torch.set_rng_state(state["rng"]["torch"])
    if run.device.type == "cuda" and "cuda" in state["rng"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])


def _new_run(
    lm: Any, spec: TranslatorSpec, data: _Data, settings: TrainSettings, device: torch.device
) -> _Run:
    """A fresh translator (seeded init, standardised on the training split) and its optimiser."""
    with torch.random.fork_rng(devices=[]):  # seeded init; the caller's RNG is left alone
        torch.manual_seed(derived_seed(settings.seed, "init"))
        translator = build_translator(spec)
    translator.set_standardisation(data.features[data.train])
    translator.to(device)
    optimiser = torch.optim.AdamW(
        translator.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
    )
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    factor = functools.partial(
        lr_factor,
        warmup=settings.warmup_steps,
        total=steps_per_epoch * settings.max_epochs,
        schedule=settings.schedule,
    )
    amp = device.type == "cuda" and next(lm.parameters()).dtype == torch.float16
    return _Run(
        lm=lm,
        translator=translator,
        optimiser=optimiser,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimiser, factor),
        scaler=torch.amp.GradScaler(device.type, enabled=amp),
        device=device,
        amp=amp,
        progress=_Progress(),
        best_state=_cpu_state(translator),
    )


def _loop(run: _Run, data: _Data, settings: TrainSettings, checkpoint: Path, key: str) -> None:
    """Train from wherever `run.progress` stands to early stopping or the last epoch."""
    progress = run.progress
    started = time.perf_counter()
    base_seconds = progress.train_seconds

    def save() -> None:
        progress.train_seconds = base_seconds + time.perf_counter() - started
        _save_checkpoint(run, checkpoint, key)

    if progress.step == 0 and not progress.history:
        _evaluate(run, data, settings)  # the untrained translator's loss: the baseline
    stop = False
    while progress.epoch < settings.max_epochs and not stop:
        batches = epoch_order(len(data.train), settings.seed, progress.epoch).split(
            settings.batch_size
        )
        for position in range(progress.position, len(batches)):
            loss = _train_step(run, data, data.train[batches[position]])
            progress.step, progress.position = progress.step + 1, position + 1
            progress.history.append([progress.step, TRAIN, loss])
            if progress.step % settings.eval_every == 0:
                stop = _evaluate(run, data, settings)
            if stop:
                break
            if progress.step % settings.checkpoint_every == 0:
                save()
        if not stop:
            progress.epoch, progress.position = progress.epoch + 1, 0
    if progress.history[-1][1] != VALIDATION:
        _evaluate(run, data, settings)  # the final weights' loss
    progress.finished = True
    progress.stop_reason = "early_stopping" if stop else "max_epochs"
    save()


def _write_loss_csv(history: list[list[Any]], path: Path) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["step", "split", "loss"])
        writer.writerows(history)


def plot_losses(history: list[list[Any]], path: Path) -> None:
    """Training loss per step (faint) and its running mean, and the validation loss."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    train = [(s, v) for s, split, v in history if split == TRAIN]
    val = [(s, v) for s, split, v in history if split == VALIDATION]
    figure = Figure(figsize=(7, 4), dpi=100)
    FigureCanvasAgg(figure)  # the Agg canvas: no display, no global pyplot state
    axes = figure.add_subplot()
    if train:
        steps, values = zip(*train, strict=True)
        axes.plot(steps, values, color="tab:blue", alpha=0.25, linewidth=0.8)
        window = max(1, len(values) // 50)
        smooth = np.convolve(values, np.ones(window) / window, mode="valid")
        axes.plot(steps[window - 1 :], smooth, color="tab:blue", label="train")
    if val:
        steps, values = zip(*val, strict=True)
        axes.plot(steps, values, "o-", color="tab:orange", markersize=3, label="validation")
    axes.set_xlabel("step")
    axes.set_ylabel("cross-entropy per caption token")
    axes.set_title("TExplain translator")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    with atomic_path(path) as tmp:
        figure.savefig(tmp, format="png")


def _metrics(
    run: _Run, data: _Data, settings: TrainSettings, context: dict[str, Any], extra: dict[str, Any]
) -> dict[str, Any]:
    progress = run.progress
    val = [h[2] for h in progress.history if h[1] == VALIDATION]
    steps_per_epoch = math.ceil(len(data.train) / settings.batch_size)
    return {
        "steps": progress.step,
        "epochs": progress.step / steps_per_epoch,
        "steps_per_epoch": steps_per_epoch,
        "train_examples": len(data.train),
        "val_examples": len(data.val),
        "first_val_loss": val[0],
        "best_val_loss": progress.best_loss,
        "best_step": progress.best_step,
        "final_val_loss": val[-1],
        "stop_reason": progress.stop_reason,
        "train_seconds": progress.train_seconds,
        **extra,
        **context,
    }


def train_translator(
    features: np.ndarray,
    captions: Sequence[str],
    lm: str,
    *,
    settings: TrainSettings,
    out_dir: str | Path,
    checkpoint_dir: str | Path,
    kind: str = "mlp",
    prefix_tokens: int = 10,
    hidden: int | None = None,
    device: str | torch.device = "auto",
    dtype: str = "auto",
) -> dict[str, Any]:
    """Train a translator from `features` [N, F] to the prefix of the causal LM `lm` (hub id or
    folder) on `captions` (one per row), resuming from checkpoint_dir/checkpoint.pt if a run
    with the same inputs left one. Writes translator.pt (the best weights), metrics.json,
    loss.csv and loss.png into `out_dir`; returns the metrics."""
    device = device if isinstance(device, torch.device) else resolve_device(device)
    lm_dtype = resolve_dtype(dtype, device)
    model, tokenizer = load_lm(lm, device, lm_dtype)
    embed_dim = model.get_input_embeddings().embedding_dim
    spec = TranslatorSpec(kind, features.shape[1], embed_dim, prefix_tokens, hidden)
    data = _prepare_data(features, captions, tokenizer, settings)
    run = _new_run(model, spec, data, settings, device)
    context = {
        "lm": lm,
        "spec": spec.to_dict(),
        "settings": settings.to_dict(),
        "device": str(device),
        "dtype": str(lm_dtype).removeprefix("torch."),
        "amp": run.amp,
    }
    # checkpoint_every changes when state is saved, not what is learnt
    keyed = {**context, "device": device.type, "settings": {**context["settings"]}}
    keyed["settings"].pop("checkpoint_every")
    key = _fingerprint(features, captions, keyed)
    checkpoint = Path(checkpoint_dir) / CHECKPOINT
    state = _load_checkpoint(checkpoint, key)
    resumed_from = None
    if state is not None:
        _restore(run, state)
        resumed_from = run.progress.step
        log.info("resuming the texplain translator from %s at step %d", checkpoint, resumed_from)
    step_before, started = run.progress.step, time.perf_counter()
    if not run.progress.finished:
        _loop(run, data, settings, checkpoint, key)
    seconds = time.perf_counter() - started
    steps_here = run.progress.step - step_before
    extra = {
        "resumed_from_step": resumed_from,
        "steps_per_s": steps_here / seconds if steps_here else None,
    }
    metrics = _metrics(run, data, settings, context, extra)
    out_dir = Path(out_dir)
    run.translator.load_state_dict(run.best_state)
    save_translator(run.translator, out_dir / "translator.pt")
    _write_loss_csv(run.progress.history, out_dir / "loss.csv")
    plot_losses(run.progress.history, out_dir / "loss.png")
    write_json(metrics, out_dir / "metrics.json")
    log.info(
        "texplain translator: %d steps, validation loss %.4f -> %.4f (best, step %d), %s",
        metrics["steps"],
        metrics["first_val_loss"],
        metrics["best_val_loss"],
        metrics["best_step"],
        metrics["stop_reason"],
    )
    return metrics
