"""Engine hooks shared by model families."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from neurovae.training.engine import Engine, Hook
from neurovae.training.optim import make_optimizer


class DiscriminatorHook(Hook):
    """Train a model's discriminator with its own optimiser and loss.

    For adversarial penalties such as the total-correlation term of the
    contrastive VAE. The module exposes ``discriminator`` (an ``nn.Module``)
    and ``discriminator_loss()``, which returns the discriminator's loss on
    detached inputs stashed by the last training step (or None). The hook
    owns the discriminator's parameters, so the engine's optimiser never
    updates them with the model's gradients; after each model step the hook
    takes one step of its own optimiser on ``discriminator_loss()``. Because
    that loss sees detached codes, none of its gradient reaches the encoders.
    The mean loss of each epoch is logged as ``discriminator``. The hook
    runs after the step, outside the engine's autocast, and
    :class:`~neurovae.nn.ContrastiveVAEModule` stashes float32 codes: its
    discriminator trains in float32 under every ``precision``, so it needs
    no gradient scaler under "16" (the scaled
    gradients the model's backward pass leaves on its parameters are
    dropped before its own backward pass).

    In distributed training the discriminator trains on the codes of the
    whole global batch: the hook gathers ``module.last_codes`` (the tuple of
    per-sample tensors the step stashed for ``discriminator_loss()``) from
    every process, in rank order, which is their order in the batch. Every
    process then computes the same loss with the same random draws and takes
    the same step; the discriminator's gradients (and the loss, on which the
    step depends) are moreover broadcast from rank 0 before the step, so its
    weights cannot drift apart across processes.

    Parameters
    ----------
    optimizer : str, default="adam"
        Optimiser of the discriminator (see :func:`make_optimizer`).
    learning_rate : float, default=1e-3
        Its learning rate.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import DiscriminatorHook, Engine, EngineConfig
    >>> from neurovae.training import TensorBatches
    >>> class Model(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...         self.discriminator = torch.nn.Linear(1, 1)
    ...     def forward(self, batch):
    ...         self.stash = batch[0][:, None] - self.w.detach()
    ...         return {"loss": ((batch[0] - self.w) ** 2).mean()}
    ...     def discriminator_loss(self):
    ...         return self.discriminator(self.stash).pow(2).mean()
    >>> model = Model()
    >>> hook = DiscriminatorHook(learning_rate=0.1)
    >>> engine = Engine(model, EngineConfig(max_iter=2), torch.device("cpu"),
    ...                 hooks=[hook])
    >>> [id(p) for g in engine.optimizer.param_groups for p in g["params"]] == [
    ...     id(model.w)]  # the engine's optimiser leaves the discriminator alone
    True
    >>> sorted(engine.fit(TensorBatches((torch.ones(4),), 2)).history)
    ['discriminator', 'loss', 'n_skipped', 'time']
    """

    def __init__(self, optimizer: str = "adam", learning_rate: float = 1e-3) -> None:
        self.optimizer_name = optimizer
        self.learning_rate = learning_rate
        self.optimizer: torch.optim.Optimizer | None = None
        self._pending: dict | None = None  # optimiser state from a checkpoint
        self._sum = 0.0
        self._count = 0

    def owned_parameters(self, module: nn.Module) -> list[nn.Parameter]:
        discriminator = getattr(module, "discriminator", None)
        return [] if discriminator is None else list(discriminator.parameters())

    def on_epoch_begin(self, engine: Engine) -> None:
        if self.optimizer is None:
            params = self.owned_parameters(engine.module)
            self.optimizer = make_optimizer(
                self.optimizer_name, params, self.learning_rate
            )
            if self._pending is not None:  # resumed from a checkpoint
                self.optimizer.load_state_dict(self._pending)
                self._pending = None
        self._sum, self._count = 0.0, 0

    def state_dict(self) -> dict:
        """The discriminator optimiser's state (for checkpoints)."""
        if self.optimizer is None:
            return {} if self._pending is None else {"optimizer": self._pending}
        return {"optimizer": self.optimizer.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Restore the optimiser state of :meth:`state_dict` (the optimiser
        itself is built at the first epoch, with the module)."""
        optimizer_state = state.get("optimizer")
        if self.optimizer is not None and optimizer_state is not None:
            self.optimizer.load_state_dict(optimizer_state)
        else:
            self._pending = optimizer_state

    def after_step(
        self, engine: Engine, batch: tuple, outputs: Mapping[str, torch.Tensor]
    ) -> None:
        if engine.distributed is not None:
            self._gather_codes(engine)
        loss = engine.module.discriminator_loss()
        if loss is None:
            return
        self.optimizer.zero_grad(set_to_none=True)  # drops the model's gradients
        loss.backward()
        if engine.distributed is not None:
            loss = self._synchronise(engine, loss)
        value = float(loss.detach())
        if math.isfinite(value):  # a non-finite loss never reaches the weights
            self.optimizer.step()
            self._sum += value
            self._count += 1
        self.optimizer.zero_grad(set_to_none=True)

    @staticmethod
    def _gather_codes(engine: Engine) -> None:
        """Replace the module's stashed codes by those of every process."""
        module = engine.module
        codes = getattr(module, "last_codes", None)
        if codes is None:
            return
        if engine.shard is not None and engine.shard.n_local == 0:
            codes = tuple(c[:0] for c in codes)  # a stand-in sample: none
        module.last_codes = tuple(engine.distributed.all_gather_rows(c) for c in codes)

    def _synchronise(self, engine: Engine, loss: torch.Tensor) -> torch.Tensor:
        """Rank 0's discriminator gradients and loss, on every process."""
        params = [p for g in self.optimizer.param_groups for p in g["params"]]
        grads = [torch.zeros_like(p) if p.grad is None else p.grad for p in params]
        flat = torch.cat([loss.detach().reshape(1), *(g.reshape(-1) for g in grads)])
        flat = engine.distributed.broadcast(flat)
        offset = 1
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n
        return flat[0]

    def on_epoch_end(self, engine: Engine, logs: dict[str, float]) -> None:
        logs["discriminator"] = self._sum / self._count if self._count else float("nan")


class ClosedFormHook(Hook):
    """Update part of a model in closed form after every epoch.

    For alternating optimisation, such as the linear transition of the
    recurrent VAE solved by ridge regression on the latent trajectories.
    After every training step that was taken, the hook adds up the tensors
    the module left in ``module.step_statistics`` (a dict of detached
    tensors, e.g. ``X^T X``, ``X^T Y`` and a count, or None); at the end of
    the epoch (after validation) it passes their sums to
    ``module.closed_form_update(sums)``, which updates the module and returns
    a dict of floats that are logged in the history. Sums are kept in
    float64; under ``torch.distributed`` they are summed over all processes
    first, so every process solves the same update (a process whose share of
    a global batch is empty, and runs a stand-in sample of weight 0, adds
    nothing).

    Examples
    --------
    A model whose parameter ``w`` is fitted by gradient steps and whose
    buffer ``mean`` is set in closed form to the mean of the data seen:

    >>> import torch
    >>> from neurovae.training import ClosedFormHook, Engine, EngineConfig
    >>> from neurovae.training import TensorBatches
    >>> class Model(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.w = torch.nn.Parameter(torch.zeros(1))
    ...         self.register_buffer("mean", torch.zeros(()))
    ...     def forward(self, batch):
    ...         x = batch[0]
    ...         self.step_statistics = {"sum": x.sum(), "count": torch.tensor(len(x))}
    ...         return {"loss": ((x - self.w) ** 2).mean()}
    ...     def closed_form_update(self, sums):
    ...         self.mean.fill_(float(sums["sum"] / sums["count"]))
    ...         return {"mean": float(self.mean)}
    >>> engine = Engine(Model(), EngineConfig(max_iter=2), torch.device("cpu"),
    ...                 hooks=[ClosedFormHook()])
    >>> engine.fit(TensorBatches((torch.arange(4.0),), 2)).history["mean"]
    [1.5, 1.5]
    """

    def __init__(self) -> None:
        self._sums: dict[str, torch.Tensor] = {}

    def on_epoch_begin(self, engine: Engine) -> None:
        self._sums = {}

    def after_step(
        self, engine: Engine, batch: tuple, outputs: Mapping[str, torch.Tensor]
    ) -> None:
        statistics = getattr(engine.module, "step_statistics", None)
        shard = getattr(engine, "shard", None)
        if not statistics or (shard is not None and shard.n_local == 0):
            return  # nothing, or a distributed stand-in sample (weight 0)
        for key, value in statistics.items():
            value = value.detach().double()
            self._sums[key] = self._sums[key] + value if key in self._sums else value

    def on_epoch_end(self, engine: Engine, logs: dict[str, float]) -> None:
        sums = self._sums
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            for value in sums.values():
                torch.distributed.all_reduce(value)
        module = engine.module
        update = getattr(module, "module", module)  # unwrap a DDP wrapper
        logs.update(update.closed_form_update(sums))
        self._sums = {}
