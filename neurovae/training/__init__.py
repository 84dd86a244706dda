"""The training engine: one loop for every neurovae model.

Minibatches with a seeded shuffle, optimisers, loss-weight schedules, early
stopping with best-weight restoration, non-finite step skipping, gradient
clipping, mixed precision, progress reporting, checkpoints to resume from, and
distributed training over ``torchrun`` processes (DDP).
Models plug in through the ``module(batch) -> dict of losses`` protocol and
:class:`Hook` objects.
"""

from neurovae.training.checkpoint import Checkpoint, CheckpointError
from neurovae.training.data import DatasetBatches, Shard, TensorBatches
from neurovae.training.device import (
    PRECISIONS,
    autocast,
    local_rng,
    make_scaler,
    resolve_device,
)
from neurovae.training.distributed import (
    DistributedContext,
    is_main_process,
    launched,
    resolve_distributed,
)
from neurovae.training.engine import (
    DivergenceError,
    Engine,
    EngineConfig,
    EngineResult,
    Hook,
)
from neurovae.training.hooks import ClosedFormHook, DiscriminatorHook
from neurovae.training.optim import OPTIMIZERS, make_optimizer
from neurovae.training.schedules import (
    Constant,
    Cyclical,
    Linear,
    Schedule,
    make_schedule,
)

__all__ = [
    "OPTIMIZERS",
    "PRECISIONS",
    "Checkpoint",
    "CheckpointError",
    "ClosedFormHook",
    "Constant",
    "Cyclical",
    "DatasetBatches",
    "DiscriminatorHook",
    "DistributedContext",
    "DivergenceError",
    "Engine",
    "EngineConfig",
    "EngineResult",
    "Hook",
    "Linear",
    "Schedule",
    "Shard",
    "TensorBatches",
    "autocast",
    "is_main_process",
    "launched",
    "local_rng",
    "make_optimizer",
    "make_scaler",
    "make_schedule",
    "resolve_device",
    "resolve_distributed",
]
