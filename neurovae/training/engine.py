"""The training loop shared by every neurovae estimator.

The engine knows a model only through a small protocol: calling the module on
a batch (a tuple of tensors) returns a dict of named scalar tensors whose
``"loss"`` entry is minimised; every entry is logged. Models that need more
than gradient steps (a closed-form update after each epoch, a discriminator
with its own optimiser) plug a :class:`Hook` in; no estimator writes a loop.
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from neurovae.nn.noise import batch_shard
from neurovae.training.checkpoint import Checkpoint, CheckpointError
from neurovae.training.data import DatasetBatches, TensorBatches
from neurovae.training.device import autocast, make_scaler
from neurovae.training.distributed import DistributedContext
from neurovae.training.optim import make_optimizer
from neurovae.training.schedules import Schedule

Batches = TensorBatches | DatasetBatches  # what the engine iterates over


class DivergenceError(RuntimeError):
    """Training produced non-finite losses or gradients step after step.

    Raised by :meth:`Engine.fit` when ``config.max_consecutive_skips`` steps in
    a row, or every step of an epoch, had a non-finite loss (or gradient norm,
    when ``max_grad_norm`` is set). The message suggests remedies. A subclass
    of :class:`RuntimeError`.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import (
    ...     DivergenceError, Engine, EngineConfig, TensorBatches
    ... )
    >>> class Broken(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...     def forward(self, batch):
    ...         return {"loss": self.w.sum() * float("nan")}
    >>> config = EngineConfig(max_iter=1, max_consecutive_skips=2)
    >>> data = TensorBatches((torch.zeros(8),), batch_size=2)
    >>> try:
    ...     Engine(Broken(), config, torch.device("cpu")).fit(data)
    ... except DivergenceError as err:
    ...     print(err)  # doctest: +ELLIPSIS
    model.fit diverged: 2 consecutive steps had a non-finite loss or gradient ...
    """


class Hook:
    """Extension point of the engine; subclasses override what they need.

    Every method receives the running :class:`Engine`, which gives access to
    ``module``, ``optimizer``, ``device``, ``epoch`` (0-based) and
    ``history``. The base methods do nothing.

    In distributed training every process runs the hooks on its own share
    of the batch (``engine.shard``, a :class:`~neurovae.training.data.Shard`,
    says which); a hook whose result must be the same on every process
    reduces over ``engine.distributed`` itself (see
    :class:`~neurovae.training.DiscriminatorHook`).

    Examples
    --------
    A hook that counts the optimiser steps and logs the count every epoch:

    >>> import torch
    >>> from neurovae.training import Engine, EngineConfig, Hook, TensorBatches
    >>> class CountSteps(Hook):
    ...     def __init__(self):
    ...         self.n_steps = 0
    ...     def after_step(self, engine, batch, outputs):
    ...         self.n_steps += 1
    ...     def on_epoch_end(self, engine, logs):
    ...         logs["n_steps"] = self.n_steps
    >>> class Mean(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...     def forward(self, batch):
    ...         return {"loss": ((batch[0] - self.w) ** 2).mean()}
    >>> data = TensorBatches((torch.zeros(6),), batch_size=4)  # 2 steps per epoch
    >>> config = EngineConfig(max_iter=3)
    >>> engine = Engine(Mean(), config, torch.device("cpu"), hooks=[CountSteps()])
    >>> engine.fit(data).history["n_steps"]
    [2, 4, 6]
    """

    def owned_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        """Parameters of ``module`` that this hook updates itself.

        The engine leaves them out of its optimiser (and of gradient
        clipping), e.g. a discriminator trained by the hook with its own
        optimiser and loss. The default owns none.
        """
        return []

    def on_epoch_begin(self, engine: Engine) -> None:
        """Called before the first step of every epoch."""

    def after_step(
        self, engine: Engine, batch: tuple, outputs: Mapping[str, torch.Tensor]
    ) -> None:
        """Called after every optimiser step that was taken."""

    def on_epoch_end(self, engine: Engine, logs: dict[str, float]) -> None:
        """Called after validation; may add entries to ``logs``."""

    def state_dict(self) -> dict:
        """State the hook carries from epoch to epoch, for checkpoints.

        Tensors and plain values only (a checkpoint is read with
        ``torch.load(weights_only=True)``). A hook that keeps state across
        epochs (an optimiser, a random generator, a counter) returns it here
        and takes it back in :meth:`load_state_dict`, or runs resumed from a
        checkpoint diverge from uninterrupted ones. The default has none.
        """
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Take back a state of :meth:`state_dict`, before a resumed run."""


@dataclass
class EngineConfig:
    """Settings of one training run (mirrors the estimators' parameters).

    Parameters
    ----------
    max_iter : int
        Maximum number of epochs.
    optimizer : str, default="adam"
        Optimiser name, a key of :data:`~neurovae.training.OPTIMIZERS`.
    learning_rate_init : float, default=1e-3
        Learning rate.
    weight_decay : float, default=0.0
        Weight decay of the optimiser.
    max_grad_norm : float or None, default=None
        Clip the global gradient norm to this value (and skip steps whose
        gradient norm is not finite); None does not clip.
    early_stopping : bool, default=False
        Stop when the validation loss has not improved by ``tol`` for
        ``n_iter_no_change`` epochs, and restore the best weights. Needs
        validation batches.
    n_iter_no_change : int, default=10
        Patience of early stopping, in epochs.
    tol : float, default=1e-4
        Smallest decrease of the validation loss that counts as improvement.
    precision : {"32", "bf16", "16"}, default="32"
        Numerical precision of the forward pass, see
        :func:`~neurovae.training.autocast`. "16" (float16) also scales the
        loss with a gradient scaler (:func:`~neurovae.training.make_scaler`)
        and needs a CUDA device. A step whose scaled gradients overflow is
        then skipped by the scaler, which halves its scale; while the scale
        is above 1 such a step is the scaler calibrating, not a divergence:
        it is counted in ``n_skipped_scaler``, not ``n_skipped``, and does
        not count towards ``max_consecutive_skips``. At a scale of 1 or
        below, an overflow is the model's own and counts as any skip.
    verbose : int, default=0
        0: silent; 1: a progress bar; 2 or more: one line per epoch.
    max_consecutive_skips : int, default=20
        Skipped steps in a row after which :class:`DivergenceError` is
        raised.
    skip_threshold : float or None, default=None
        Skip (and count in ``n_skipped``) every update whose gradient norm,
        before clipping, is above this value, as very deep VAEs do against
        rare huge gradients; None skips only non-finite ones. An epoch whose
        every update is skipped raises :class:`DivergenceError` instead of
        stalling silently.
    skip_warmup : int, default=0
        The first ``skip_warmup`` training steps (counted from the start of
        training, across epochs) are never skipped for a large gradient
        norm, only for a non-finite one: the first steps of a fresh network
        have large gradients, and a threshold tuned for later training would
        otherwise skip them all.
    ema_decay : float or None, default=None
        Keep an exponential moving average of the weights, updated after
        every step (``ema = decay * ema + (1 - decay) * weights``); it is
        what validation evaluates and what the module holds after training.
        None keeps the raw weights.
    name : str, default="model"
        Name used in progress output and error messages.

    Examples
    --------
    >>> from neurovae.training import EngineConfig
    >>> config = EngineConfig(max_iter=50, early_stopping=True, n_iter_no_change=5)
    >>> config.optimizer, config.learning_rate_init, config.precision
    ('adam', 0.001, '32')
    """

    max_iter: int
    optimizer: str = "adam"
    learning_rate_init: float = 1e-3
    weight_decay: float = 0.0
    max_grad_norm: float | None = None
    early_stopping: bool = False
    n_iter_no_change: int = 10
    tol: float = 1e-4
    precision: str = "32"
    verbose: int = 0
    max_consecutive_skips: int = 20
    skip_threshold: float | None = None
    skip_warmup: int = 0
    ema_decay: float | None = None
    name: str = "model"


@dataclass
class EngineResult:
    """What a run returns: the history and how the run ended.

    Attributes
    ----------
    history : dict of str to list
        One value per epoch (including those of earlier runs when a history
        was passed to :meth:`Engine.fit`) for every loss term, every
        ``val_``-prefixed validation term, every scheduled attribute,
        ``n_skipped`` (non-finite steps skipped), ``n_skipped_scaler``
        (with a gradient scaler: steps it skipped while calibrating its
        scale, see :class:`EngineConfig`) and ``time`` (seconds).
    n_epochs : int
        Epochs completed by this run.
    best_epoch : int or None
        Epoch (counted from the start of the history, 0-based) whose weights
        the module holds after training; None if no epoch completed.
    stopped_early : bool
        Whether early stopping ended the run.
    interrupted : bool
        Whether the run was interrupted by ``KeyboardInterrupt``.
    n_resumed : int
        Epochs of ``n_epochs`` restored from a checkpoint rather than
        trained by this call (0 without a checkpoint).
    extra : dict
        Free-form room for model-specific results.

    Examples
    --------
    A module already at its optimum never improves on its first epoch, so
    early stopping ends the run after ``n_iter_no_change`` more epochs:

    >>> import torch
    >>> from neurovae.training import Engine, EngineConfig, TensorBatches
    >>> class Mean(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...     def forward(self, batch):
    ...         return {"loss": ((batch[0] - self.w) ** 2).mean()}
    >>> data = TensorBatches((torch.zeros(8),), batch_size=4)
    >>> config = EngineConfig(max_iter=100, early_stopping=True, n_iter_no_change=3)
    >>> result = Engine(Mean(), config, torch.device("cpu")).fit(data, val=data)
    >>> result.n_epochs, result.best_epoch, result.stopped_early
    (4, 0, True)
    >>> sorted(result.history)
    ['loss', 'n_skipped', 'time', 'val_loss']
    """

    history: dict[str, list]
    n_epochs: int
    best_epoch: int | None = None
    stopped_early: bool = False
    interrupted: bool = False
    n_resumed: int = 0
    extra: dict = field(default_factory=dict)


class Engine:
    """Run minibatch training of ``module``.

    Parameters
    ----------
    module : torch.nn.Module
        Model already on ``device``; ``module(batch)`` returns the loss dict.
    config : EngineConfig
        Optimiser, stopping and logging settings.
    device : torch.device
        Where the module lives.
    schedules : dict of str to Schedule, optional
        Attributes of ``module`` set before every step from training progress
        (in epochs), e.g. ``{"beta": Linear(4.0, warmup_iter=10)}``.
    hooks : sequence of Hook, optional
        Model-specific steps plugged into the loop.
    distributed : DistributedContext, optional
        Train over a ``torch.distributed`` process group (see
        :func:`~neurovae.training.resolve_distributed`): every process runs
        the engine with the same module, seeds and *global* batches, built
        with ``shard=(rank, world_size)`` so that each iterates over its
        share. Gradients are averaged by
        :class:`~torch.nn.parallel.DistributedDataParallel` (each share's
        loss weighted by its size, so that a step follows the mean loss of
        the global batch however unevenly it splits); logged figures,
        validation losses and every decision (skipping a step, early
        stopping) come from figures reduced over all processes, so all
        processes take the same decisions and end with the same weights.
        Only rank 0 prints and writes checkpoints. The engine's ``module``
        stays the plain module.
    scaler : torch.amp.GradScaler, optional
        Gradient scaler to train with; by default
        :func:`~neurovae.training.make_scaler` gives one for precision "16"
        (on CUDA; elsewhere it raises) and none for the other precisions.
        The backward pass then runs on the scaled loss and the gradients
        are unscaled before they are clipped, measured or applied. Passing
        one (e.g. ``torch.amp.GradScaler("cpu")``) runs the scaled path on
        any device, which the tests use.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import Engine, EngineConfig, TensorBatches
    >>> class Quadratic(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...     def forward(self, batch):
    ...         return {"loss": ((batch[0] - self.w) ** 2).mean()}
    >>> module = Quadratic()
    >>> data = TensorBatches((torch.full((8,), 3.0),), batch_size=4)
    >>> config = EngineConfig(max_iter=200, learning_rate_init=0.1)
    >>> result = Engine(module, config, torch.device("cpu")).fit(data)
    >>> round(module.w.item(), 2)
    3.0
    """

    def __init__(
        self,
        module: nn.Module,
        config: EngineConfig,
        device: torch.device,
        schedules: Mapping[str, Schedule] | None = None,
        hooks: Sequence[Hook] = (),
        distributed: DistributedContext | None = None,
        scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        self.scaler = (
            scaler if scaler is not None else make_scaler(device, config.precision)
        )
        self.module = module
        self.config = config
        self.device = device
        self.schedules = dict(schedules or {})
        self.hooks = list(hooks)
        self.distributed = distributed
        self.shard = None  # this process's share of the current batch
        self.epoch = 0
        self.history: dict[str, list] = {}
        owned = {id(p) for hook in self.hooks for p in hook.owned_parameters(module)}
        self._params = [
            p for p in module.parameters() if p.requires_grad and id(p) not in owned
        ]
        self._ddp = None
        if distributed is not None:  # first: all processes start from rank 0's
            self._ddp = distributed.wrap(module, self._params, device)
        self.optimizer = make_optimizer(
            config.optimizer,
            self._params,
            config.learning_rate_init,
            config.weight_decay,
        )
        self._snapshot: dict[str, torch.Tensor] | None = None
        self._ema: list[torch.Tensor] | None = None
        if config.ema_decay is not None:
            self._ema = [p.detach().clone() for p in self._params]

    # -- helpers ---------------------------------------------------------
    def _set_schedules(self, progress: float | None) -> None:
        for name, schedule in self.schedules.items():
            value = schedule.final if progress is None else schedule(progress)
            setattr(self.module, name, value)

    @contextlib.contextmanager
    def averaged_weights(self):
        """Within the block the module holds the moving average of its
        weights (when ``config.ema_decay`` is set); the raw weights are put
        back afterwards."""
        if self._ema is None:
            yield
            return
        raw = [p.detach().clone() for p in self._params]
        with torch.no_grad():
            torch._foreach_copy_([p.data for p in self._params], self._ema)
        try:
            yield
        finally:
            with torch.no_grad():
                torch._foreach_copy_([p.data for p in self._params], raw)

    def _update_ema(self) -> None:
        with torch.no_grad():
            torch._foreach_lerp_(
                self._ema,
                [p.detach() for p in self._params],
                1.0 - self.config.ema_decay,
            )

    def _save_snapshot(self) -> None:
        with self.averaged_weights():
            self._copy_state()

    def _copy_state(self) -> None:
        state = self.module.state_dict()
        if self._snapshot is None:
            self._snapshot = {k: v.detach().clone() for k, v in state.items()}
        else:
            for k, v in state.items():
                self._snapshot[k].copy_(v)

    def _restore_snapshot(self) -> None:
        if self._snapshot is not None:
            self.module.load_state_dict(self._snapshot)

    def _divergence(self, detail: str) -> DivergenceError:
        cfg = self.config
        fp16 = (
            " With precision='16', values beyond float16's range (65504) are "
            "infinite: precision='bf16' has float32's range."
            if cfg.precision == "16"
            else ""
        )
        return DivergenceError(
            f"{cfg.name}.fit diverged: {detail}. Lower learning_rate_init "
            f"(now {cfg.learning_rate_init:g}), set max_grad_norm (e.g. 1.0; now "
            f"{cfg.max_grad_norm}), or rescale the input (e.g. standardise it)."
            f"{fp16}"
        )

    @torch.no_grad()
    def evaluate(self, batches: Batches) -> dict[str, float]:
        """Mean of every loss term over ``batches``, in eval mode.

        Scheduled weights are set to their final values, so that the losses of
        different epochs measure one objective. Distributed, each process
        evaluates its share of every batch and the sums are reduced over all
        processes (a stand-in sample of an empty share counts for nothing).
        """
        shards = batches.shards() if self.distributed is not None else None
        was_training = self.module.training
        self.module.eval()
        self._set_schedules(None)
        total, keys, n_seen = None, None, 0
        try:
            with self.averaged_weights():
                for i, batch in enumerate(batches):
                    with autocast(self.device, self.config.precision):
                        out = self.module(batch)
                    n = batch[0].shape[0] if shards is None else shards[i].n_local
                    values = torch.stack([v.detach().double() for v in out.values()])
                    values = values * n if n else torch.zeros_like(values)
                    total = values if total is None else total + values
                    keys = list(out)
                    n_seen += n
        finally:
            self.module.train(was_training)
        if total is None:  # no batches
            return {}
        packed = torch.cat([total, total.new_tensor([n_seen])])
        if self.distributed is not None:
            packed = self.distributed.all_reduce(packed)
        packed = packed.tolist()
        return {key: value / packed[-1] for key, value in zip(keys, packed)}

    def _train_epoch(self, batches: Batches) -> dict[str, float]:
        cfg = self.config
        module, optimizer, params = self.module, self.optimizer, self._params
        scaler = self.scaler
        module.train()
        sums: dict[str, float] = {}
        n_seen = n_skipped = n_large = n_scaler = consecutive = 0
        n_batches = len(batches)
        shards = None if self.distributed is None else batches.shards()
        if self._ddp is not None:
            self._ddp.train()
        for i, batch in enumerate(batches):
            if self.schedules:
                self._set_schedules(self.epoch + i / n_batches)
            if shards is None:
                with autocast(self.device, cfg.precision):
                    out = module(batch)
                loss = out["loss"]
            else:
                self.shard = shard = shards[i]
                with (
                    batch_shard(shard.positions, shard.n_global),
                    autocast(self.device, cfg.precision),
                ):
                    out = self._ddp(batch)
                # DDP averages gradients over the processes: weighting each
                # share's mean loss by its size times their number makes the
                # step follow the mean loss of the whole global batch.
                weight = shard.n_local * self.distributed.world_size / shard.n_global
                loss = out["loss"] * weight
            optimizer.zero_grad(set_to_none=True)
            if scaler is None:
                loss.backward()
            else:  # (under DDP the scaled gradients are averaged, then unscaled)
                scaler.scale(loss).backward()
                scaler.unscale_(optimizer)  # clip and measure the true gradients
            values = torch.stack([v.detach().float() for v in out.values()])
            measure = (
                cfg.max_grad_norm is not None
                or cfg.skip_threshold is not None
                or scaler is not None  # its overflows show as a non-finite norm
            )
            if measure:
                # clipping computes the gradient norm anyway: check it too.
                # (Without clipping a separate pass over every gradient would
                # cost ~4 % of a small model's step; a finite loss with a
                # non-finite gradient then shows up as a non-finite loss at
                # the next step, which is skipped and counted in turn.)
                clip = math.inf if cfg.max_grad_norm is None else cfg.max_grad_norm
                norm = nn.utils.clip_grad_norm_(params, clip)
                values = torch.cat([values, norm.float().reshape(1)])
            if shards is not None:
                values = self._reduce_step(values, shards[i], measure)
            values = values.tolist()  # the one device sync of the step
            norm = values.pop() if measure else 0.0
            terms = dict(zip(out, values))
            finite = math.isfinite(norm) and math.isfinite(terms["loss"])
            too_large = (
                cfg.skip_threshold is not None
                and norm > cfg.skip_threshold
                and self.epoch * n_batches + i >= cfg.skip_warmup
            )
            n = batch[0].shape[0] if shards is None else shards[i].n_global
            if scaler is not None and (not finite or too_large):
                if self._scaler_skip(terms["loss"], norm):
                    n_scaler += 1  # the scale was too large: not a divergence
                    optimizer.zero_grad(set_to_none=True)
                    for key, value in terms.items():  # the loss is finite
                        sums[key] = sums.get(key, 0.0) + value * n
                    n_seen += n
                    continue
            if not finite or too_large:
                n_skipped += 1
                consecutive += 1
                n_large += finite and too_large
                optimizer.zero_grad(set_to_none=True)
                if consecutive >= cfg.max_consecutive_skips:
                    raise self._divergence(
                        f"{consecutive} consecutive steps {self._skip_reason()} "
                        f"(epoch {self.epoch + 1})"
                    )
                continue
            consecutive = 0
            if scaler is None:
                optimizer.step()
            else:  # finite gradients (finite norm): the scaler steps too
                scaler.step(optimizer)
                scaler.update()
            if self._ema is not None:
                self._update_ema()
            for hook in self.hooks:
                hook.after_step(self, batch, out)
            for key, value in terms.items():
                sums[key] = sums.get(key, 0.0) + value * n
            n_seen += n
        self.shard = None
        if n_seen == 0:
            raise self._divergence(
                f"every step of epoch {self.epoch + 1} {self._skip_reason()}"
            )
        logs = {key: value / n_seen for key, value in sums.items()}
        logs["n_skipped"] = n_skipped
        if cfg.skip_threshold is not None:
            logs["n_skipped_large"] = n_large
        if scaler is not None:
            logs["n_skipped_scaler"] = n_scaler
        return logs

    def _scaler_skip(self, loss: float, norm: float) -> bool:
        """End a step that is not taken under the gradient scaler; whether
        it was the scaler's own skip.

        The scaler has unscaled the gradients and recorded whether they were
        finite; :meth:`torch.amp.GradScaler.update` consumes that record (it
        must run before the next step) and halves the scale if they were
        not. A finite loss with non-finite gradients, at a scale above 1 that
        the overflow made the scaler lower, is a scaled-gradient overflow:
        the scaler skips the step and calibrates its scale, which is no sign
        of divergence. Anything else (a non-finite loss, a norm above
        ``skip_threshold``, an overflow at a scale of 1 or below, where the
        gradients overflow by themselves) is the engine's skip. Every figure
        involved (the loss and norm reduced over the processes, the scale
        that evolves alike on all of them, and the scaler's check of the
        already averaged gradients) is the same on every process, so all
        take the same decision.
        """
        scaler = self.scaler
        before = scaler.get_scale()  # (a device sync, on skipped steps only)
        scaler.update()
        return (
            math.isfinite(loss)
            and not math.isfinite(norm)
            and before > 1.0
            and scaler.get_scale() < before
        )

    def _reduce_step(self, values: torch.Tensor, shard, measure: bool) -> torch.Tensor:
        """The step's figures over all processes: each loss term's mean over
        the global batch, then (when ``measure``) the gradient norm, computed
        by each process on the already averaged gradients and averaged too,
        so that every process takes the same skip decision. A non-finite
        loss on any process (a stand-in sample's included) makes the loss
        non-finite everywhere."""
        k = len(values) - int(measure)
        terms = values[:k].double()
        bad = (~torch.isfinite(terms)).any().double().reshape(1)
        terms = terms * shard.n_local if shard.n_local else torch.zeros_like(terms)
        parts = [terms, bad]
        if measure:
            parts.append(values[k:].double() / self.distributed.world_size)
        packed = self.distributed.all_reduce(torch.cat(parts))
        terms = packed[:k] / shard.n_global
        if packed[k] > 0:
            terms[0] = math.nan
        return torch.cat([terms, packed[k + 1 :]])

    def _skip_reason(self) -> str:
        if self.config.skip_threshold is None:
            return "had a non-finite loss or gradient"
        return (
            "had a non-finite loss or gradient, or a gradient norm above "
            f"skip_threshold={self.config.skip_threshold:g}"
        )

    @property
    def is_main(self) -> bool:
        """Whether this process prints and writes (rank 0, or not distributed)."""
        return self.distributed is None or self.distributed.is_main

    def _report(self, logs: dict[str, float], total: int, bar) -> None:
        if not self.is_main:
            return
        hidden = ("time", "n_skipped", "n_skipped_large", "n_skipped_scaler")
        shown = {k: v for k, v in logs.items() if k not in hidden}
        if self.config.verbose == 1:
            bar.set_postfix({k: f"{v:.4g}" for k, v in shown.items()}, refresh=False)
            bar.update(1)
        elif self.config.verbose >= 2:
            terms = ", ".join(f"{k}={v:.4g}" for k, v in shown.items())
            skipped = logs.get("n_skipped", 0)
            extra = f", {skipped} steps skipped" if skipped else ""
            print(
                f"[{self.config.name}.fit] epoch {self.epoch + 1}/{total}: "
                f"{terms} ({logs['time']:.2f}s{extra})",
                flush=True,
            )

    # -- checkpoints -----------------------------------------------------
    def _generators(self, train: Batches) -> list[torch.Generator]:
        """The random generators training draws from: those the module (or
        any submodule) keeps as ``generator``, then the shuffling one."""
        found: list[torch.Generator] = []
        for m in self.module.modules():
            g = m.__dict__.get("generator")
            if isinstance(g, torch.Generator) and all(g is not h for h in found):
                found.append(g)
        g = getattr(train, "generator", None)
        if isinstance(g, torch.Generator) and all(g is not h for h in found):
            found.append(g)
        return found

    def _state(self, train: Batches, progress: dict) -> dict:
        """Everything a resumed run needs to continue bitwise (CPU)."""
        snapshot = None
        if self.config.early_stopping or self._ema is not None:
            snapshot = self._snapshot  # otherwise it equals the module's weights
        return {
            "module": self.module.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "hooks": [hook.state_dict() for hook in self.hooks],
            "generators": [g.get_state() for g in self._generators(train)],
            "snapshot": snapshot,
            "ema": self._ema,
            "scaler": None if self.scaler is None else self.scaler.state_dict(),
            "history": self.history,
            "progress": progress,
        }

    def _restore(self, state: dict, train: Batches, start_epoch: int) -> dict:
        """Load a state saved by :meth:`_state`; returns its ``progress``."""
        progress = state["progress"]
        generators = self._generators(train)
        if (
            progress.get("start_epoch") != start_epoch
            or len(state["hooks"]) != len(self.hooks)
            or len(state["generators"]) != len(generators)
            or (state["ema"] is None) != (self._ema is None)
            or (state.get("scaler") is None) != (self.scaler is None)
        ):
            raise CheckpointError(
                "the checkpoint does not match this run's engine (start epoch, "
                "hooks, random generators, moving average or gradient scaler). "
                "Delete it to start afresh."
            )
        try:
            self.module.load_state_dict(state["module"])
            self.optimizer.load_state_dict(state["optimizer"])
        except (RuntimeError, ValueError, KeyError) as exc:
            raise CheckpointError(
                f"the checkpoint's weights do not fit this model ({exc}). Delete "
                "it to start afresh."
            ) from exc
        if self.scaler is not None:  # its scale and growth tracker
            self.scaler.load_state_dict(state["scaler"])
        for hook, hook_state in zip(self.hooks, state["hooks"]):
            hook.load_state_dict(hook_state)
        for g, g_state in zip(generators, state["generators"]):
            g.set_state(g_state)
        if self._ema is not None:
            with torch.no_grad():
                torch._foreach_copy_(self._ema, list(state["ema"]))
        if state["snapshot"] is not None:
            self._snapshot = {
                k: v.to(self.device) for k, v in state["snapshot"].items()
            }
        elif progress["best_epoch"] is not None:  # the last epoch's weights
            self._copy_state()
        self.history = state["history"]
        return progress

    def _save_checkpoint(
        self, checkpoint: Checkpoint, train: Batches, progress: dict, complete: bool
    ) -> None:
        """Write the checkpoint (rank 0 only when distributed; the others
        learn whether it worked, so that all stop together if not)."""
        if self.distributed is None:
            checkpoint.save(self._state(train, progress), complete=complete)
            return
        error = None
        if self.is_main:
            try:
                checkpoint.save(self._state(train, progress), complete=complete)
            except (OSError, CheckpointError) as exc:
                error = exc
        message = self.distributed.broadcast_object(
            None if error is None else f"{type(error).__name__}: {error}"
        )
        if error is not None:
            raise error
        if message is not None:
            raise CheckpointError(
                f"rank 0 could not write the checkpoint {checkpoint.path} ({message})"
            )

    def _check_same_checkpoint(self, checkpoint: Checkpoint, result) -> None:
        """Stop every process unless all resume from the same checkpoint."""
        mine = (result.n_resumed, bool(checkpoint.complete), self._digest())
        seen = self.distributed.all_gather_object(mine)
        if any(other != seen[0] for other in seen):
            raise CheckpointError(
                f"the processes of this distributed fit read different "
                f"checkpoints at {checkpoint.path} (epochs resumed by rank: "
                f"{[other[0] for other in seen]}); is the file on a shared "
                "file system that every node sees alike? Delete it to start "
                "afresh."
            )

    def _digest(self) -> float:
        """A cheap fingerprint of the weights (to compare processes)."""
        with torch.no_grad():
            state = self.module.state_dict().values()
            return float(
                sum(t.cpu().double().sum() for t in state if t.is_floating_point())
            )

    # -- main loop -------------------------------------------------------
    def fit(
        self,
        train: Batches,
        val: Batches | None = None,
        *,
        history: dict[str, list] | None = None,
        start_epoch: int = 0,
        checkpoint: Checkpoint | None = None,
    ) -> EngineResult:
        """Train for up to ``config.max_iter`` epochs.

        Parameters
        ----------
        train : TensorBatches or DatasetBatches
            Training minibatches (shuffled by their own generator).
        val : TensorBatches or DatasetBatches, optional
            Validation batches; needed for early stopping.
        history : dict, optional
            History to append to (``warm_start``).
        start_epoch : int, default=0
            Epochs already run, so schedules continue where they stopped.
        checkpoint : Checkpoint, optional
            Write the training state there after every epoch. When its
            :meth:`~Checkpoint.read` found a checkpoint of this run, the
            run first restores that state (weights, optimiser, hooks, random
            generators, early-stopping state, moving average, gradient
            scaler, history) and
            continues from it; a finished one trains no further. In
            distributed training every process reads the file and only rank
            0 writes it; processes that read different checkpoints (e.g. a
            file not yet visible on another node) stop with a
            :class:`CheckpointError` rather than train apart.

        Returns
        -------
        EngineResult
        """
        cfg = self.config
        if cfg.early_stopping and val is None:
            raise ValueError("early stopping needs validation data")
        self.history = history if history is not None else {}
        total = start_epoch + cfg.max_iter
        best_loss, best_epoch, no_improve = math.inf, None, 0
        result = EngineResult(self.history, 0)
        if checkpoint is not None and checkpoint.state is not None:
            state, checkpoint.state = checkpoint.state, None
            try:
                progress = self._restore(state, train, start_epoch)
            except CheckpointError as exc:
                raise CheckpointError(f"{checkpoint.path}: {exc}") from exc
            del state
            best_loss, best_epoch = progress["best_loss"], progress["best_epoch"]
            no_improve = progress["no_improve"]
            result = EngineResult(
                self.history,
                progress["n_epochs"],
                stopped_early=progress["stopped_early"],
                n_resumed=progress["n_epochs"],
            )
            if cfg.verbose >= 2 and self.is_main:
                what = "a finished run" if checkpoint.complete else "a checkpoint"
                print(
                    f"[{cfg.name}.fit] resuming {what} at epoch "
                    f"{start_epoch + result.n_epochs}/{total} ({checkpoint.path})",
                    flush=True,
                )
        if self.distributed is not None and checkpoint is not None:
            self._check_same_checkpoint(checkpoint, result)
        bar = tqdm(
            total=cfg.max_iter,
            initial=result.n_epochs,
            desc=f"{cfg.name}.fit",
            unit="epoch",
            disable=cfg.verbose != 1 or not self.is_main,
            leave=True,
        )
        first = cfg.max_iter if result.stopped_early else result.n_epochs
        try:
            for local_epoch in range(first, cfg.max_iter):
                self.epoch = start_epoch + local_epoch
                tic = time.perf_counter()
                for hook in self.hooks:
                    hook.on_epoch_begin(self)
                logs = self._train_epoch(train)
                for name in self.schedules:  # values of the epoch's last step
                    logs[name] = float(getattr(self.module, name))
                if val is not None:
                    logs.update({f"val_{k}": v for k, v in self.evaluate(val).items()})
                for hook in self.hooks:
                    hook.on_epoch_end(self, logs)
                logs["time"] = time.perf_counter() - tic
                for key, value in logs.items():
                    self.history.setdefault(key, []).append(value)
                result.n_epochs = local_epoch + 1
                self._report(logs, total, bar)

                monitored = logs["val_loss"] if val is not None else logs["loss"]
                if not cfg.early_stopping or monitored < best_loss:
                    # without early stopping the snapshot is simply the last epoch
                    self._save_snapshot()
                    best_epoch = self.epoch
                if cfg.early_stopping:
                    if not monitored < best_loss - cfg.tol:
                        no_improve += 1
                    else:
                        no_improve = 0
                best_loss = min(best_loss, monitored)
                if cfg.early_stopping and no_improve >= cfg.n_iter_no_change:
                    result.stopped_early = True
                if checkpoint is not None:
                    progress = {
                        "start_epoch": start_epoch,
                        "n_epochs": result.n_epochs,
                        "best_loss": best_loss,
                        "best_epoch": best_epoch,
                        "no_improve": no_improve,
                        "stopped_early": result.stopped_early,
                    }
                    self._save_checkpoint(
                        checkpoint,
                        train,
                        progress,
                        complete=result.stopped_early
                        or result.n_epochs == cfg.max_iter,
                    )
                if result.stopped_early:
                    break
        except KeyboardInterrupt:
            if result.n_epochs == 0:  # nothing worth keeping: stop as asked
                raise
            result.interrupted = True
            kept = (
                "no completed epoch"
                if best_epoch is None
                else (f"the weights of epoch {best_epoch + 1}")
            )
            resume = (
                ""
                if checkpoint is None
                else f" Fit again to resume from the checkpoint {checkpoint.path}."
            )
            warnings.warn(
                f"{cfg.name}.fit was interrupted after {result.n_epochs} epoch(s); "
                f"keeping {kept}.{resume}",
                UserWarning,
                stacklevel=3,
            )
            self._restore_snapshot()
        finally:
            bar.close()
            self._set_schedules(None)
        if (cfg.early_stopping or self._ema is not None) and not result.interrupted:
            # the best epoch's weights, or with a moving average its average
            self._restore_snapshot()
        result.best_epoch = best_epoch
        return result
