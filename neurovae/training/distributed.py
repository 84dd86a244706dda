"""Distributed training: ``torch.distributed`` process groups and DDP.

A script that calls ``estimator.fit(X)`` and is launched by ``torchrun`` (one
or many nodes) trains with :class:`~torch.nn.parallel.DistributedDataParallel`:
:func:`resolve_distributed` detects the launch, forms the process group
(NCCL on CUDA, Gloo on the CPU) and returns a :class:`DistributedContext`
that the engine uses for everything that must agree across processes: the
DDP wrapper, the per-step reduction of losses and gradient norms, validation
figures, and checkpoint writes (by rank 0 only).

Lifecycle of the process group: one that the user initialised is used as it
is and never destroyed; one that neurovae initialises is kept for the rest of
the script (later fits reuse it) and destroyed at interpreter exit.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from neurovae.training.device import resolve_device

_ENV = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name, default))
    except ValueError:
        return default


def launched() -> bool:
    """Whether this process is one of several of a distributed launch.

    True when a ``torch.distributed`` process group of more than one process
    is initialised, or when the environment set by ``torchrun`` says
    ``WORLD_SIZE`` > 1.

    Returns
    -------
    bool

    Examples
    --------
    >>> from neurovae.training import launched
    >>> launched()  # a plain python process
    False
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size() > 1
    return _env_int("WORLD_SIZE", 1) > 1


def is_main_process(distributed="auto") -> bool:
    """Whether this process writes files: False only on the ranks other than
    0 of a distributed launch that ``distributed`` takes part in.

    Parameters
    ----------
    distributed : {"auto", True, False}, default="auto"
        An estimator's ``distributed`` parameter. With False every process
        trains on its own and writes its own files.

    Returns
    -------
    bool

    Examples
    --------
    >>> from neurovae.training import is_main_process
    >>> is_main_process()  # outside torchrun: the one process writes
    True
    """
    if distributed is False:
        return True
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank() == 0
    return _env_int("RANK", 0) == 0


@dataclass
class DistributedContext:
    """The process group a fit trains over, and the collectives it uses.

    Made by :func:`resolve_distributed`; the engine takes it as its
    ``distributed`` argument.

    Attributes
    ----------
    rank : int
        This process's rank in the group (0 writes files and prints).
    world_size : int
        Number of processes.
    backend : str
        ``"nccl"`` or ``"gloo"``.
    group : torch.distributed.ProcessGroup or None
        The group (None: the default one).
    created : bool
        Whether neurovae initialised the group (it then destroys it at
        interpreter exit); False for a group the user initialised.

    Examples
    --------
    >>> import os, torch
    >>> import torch.distributed as dist
    >>> from neurovae.training import DistributedContext
    >>> store = dist.HashStore()  # a group of one process, for illustration
    >>> dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    >>> context = DistributedContext(rank=0, world_size=1, backend="gloo")
    >>> total = torch.tensor([1.0, 2.0])
    >>> context.all_reduce(total).tolist()
    [1.0, 2.0]
    >>> dist.destroy_process_group()
    """

    rank: int
    world_size: int
    backend: str
    group: object = None
    created: bool = False

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0."""
        return self.rank == 0

    # -- collectives -----------------------------------------------------
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over the processes, in place; returns it."""
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=self.group)
        return tensor

    def broadcast(self, tensor: torch.Tensor) -> torch.Tensor:
        """Overwrite ``tensor`` with rank 0's, in place; returns it."""
        dist.broadcast(tensor, self._global_rank(0), group=self.group)
        return tensor

    def broadcast_object(self, obj):
        """Rank 0's ``obj`` (any picklable value), on every process."""
        box = [obj]
        dist.broadcast_object_list(box, self._global_rank(0), group=self.group)
        return box[0]

    def all_gather_object(self, obj) -> list:
        """Every process's ``obj``, in rank order."""
        out = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def all_gather_rows(self, tensor: torch.Tensor) -> torch.Tensor:
        """Concatenate, in rank order, each process's ``tensor`` (whose first
        dimensions may differ; the others must agree)."""
        n = torch.tensor([tensor.shape[0]], device=tensor.device)
        sizes = [torch.zeros_like(n) for _ in range(self.world_size)]
        dist.all_gather(sizes, n, group=self.group)
        sizes = [int(s) for s in sizes]
        longest = max(sizes)
        padded = tensor.new_zeros((longest, *tensor.shape[1:]))
        padded[: tensor.shape[0]] = tensor
        parts = [torch.zeros_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded.contiguous(), group=self.group)
        return torch.cat([part[:size] for part, size in zip(parts, sizes)])

    def _global_rank(self, rank: int) -> int:
        if self.group is None:
            return rank
        return dist.get_global_rank(self.group, rank)

    # -- the model ---------------------------------------------------------
    def wrap(
        self, module: nn.Module, params: list[nn.Parameter], device: torch.device
    ) -> nn.parallel.DistributedDataParallel:
        """``module`` in DDP, synchronising the gradients of ``params`` only.

        Every parameter and buffer of ``module`` is first set to rank 0's
        values, so that all processes start identical; the parameters not in
        ``params`` (those a hook trains itself, or frozen ones) are left out
        of DDP's gradient reduction.
        """
        with torch.no_grad():
            for tensor in [*module.parameters(), *module.buffers()]:
                self.broadcast(tensor.data)
        keep = {id(p) for p in params}
        ignored = [name for name, p in module.named_parameters() if id(p) not in keep]
        if ignored:
            nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(  # noqa: E501
                module, ignored
            )
        try:
            return nn.parallel.DistributedDataParallel(
                module,
                device_ids=[device.index] if device.type == "cuda" else None,
                process_group=self.group,
            )
        finally:
            module.__dict__.pop("_ddp_params_and_buffers_to_ignore", None)


_CREATED: DistributedContext | None = None


def _unindexed_cuda(device) -> bool:
    """Whether a ``device`` parameter leaves the GPU to choose ("auto",
    "cuda")."""
    if isinstance(device, str):
        return device in ("auto", "cuda")
    return device.type == "cuda" and device.index is None


def _destroy_created() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def resolve_distributed(
    distributed, device="auto"
) -> tuple[DistributedContext | None, torch.device]:
    """Resolve an estimator's ``distributed`` parameter for a fit.

    Parameters
    ----------
    distributed : {"auto", True, False}
        ``"auto"`` trains distributed when this process is one of several of
        a launch (see :func:`launched`); True requires a process group (an
        initialised one, or the environment of ``torchrun`` to form one);
        False never trains distributed.
    device : str or torch.device, default="auto"
        An estimator's ``device`` parameter (see
        :func:`~neurovae.training.resolve_device`). In distributed training
        ``"auto"`` and ``"cuda"`` without an index mean the GPU of the
        process's ``LOCAL_RANK``, one GPU per process as ``torchrun``
        expects.

    Returns
    -------
    context : DistributedContext or None
        None for a single-process fit.
    device : torch.device
        The device to train on.

    Raises
    ------
    ValueError
        If ``distributed`` is not one of the accepted values, if it is True
        and no process group can be formed, or if an initialised NCCL group
        is asked to train on the CPU.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import resolve_distributed
    >>> resolve_distributed("auto", "cpu")  # not launched
    (None, device(type='cpu'))
    """
    global _CREATED
    requested = device
    if not (distributed is True or distributed is False or distributed == "auto"):
        raise ValueError(
            f"distributed must be 'auto', True or False; got {distributed!r}"
        )
    device = resolve_device(device)
    if distributed is False or (distributed == "auto" and not launched()):
        return None, device
    if device.type == "cuda" and _unindexed_cuda(requested):
        device = resolve_device(f"cuda:{_env_int('LOCAL_RANK', 0)}")
    if not dist.is_available():
        raise ValueError(
            "distributed=True but this build of torch has no torch.distributed"
        )
    if dist.is_initialized():
        backend = str(dist.get_backend())
        if backend == "nccl" and device.type != "cuda":
            raise ValueError(
                f"the initialised process group uses NCCL, which needs CUDA "
                f"tensors, but the fit runs on {device}. Use device='cuda' or "
                "a Gloo process group."
            )
        created = _CREATED is not None
        return (
            DistributedContext(
                dist.get_rank(), dist.get_world_size(), backend, created=created
            ),
            device,
        )
    missing = [name for name in _ENV if name not in os.environ]
    if missing:
        raise ValueError(
            "distributed=True but no torch.distributed process group is "
            "initialised and this process was not started by torchrun ("
            + ", ".join(missing)
            + " unset). Launch the script with `torchrun --nproc_per_node=N "
            "script.py`, initialise a process group yourself, or set "
            "distributed='auto' or False."
        )
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend)
    atexit.register(_destroy_created)
    _CREATED = DistributedContext(
        dist.get_rank(), dist.get_world_size(), backend, created=True
    )
    return _CREATED, device
