"""Devices, numerical precision and local random state."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: Accepted ``precision`` values: "32" (float32) and "bf16" (bfloat16 autocast).
PRECISIONS = ("32", "bf16")


def resolve_device(device: str | torch.device) -> torch.device:
    """Turn a ``device`` parameter into a :class:`torch.device`.

    ``"auto"`` picks CUDA, then Apple MPS, then the CPU. An explicit device
    that is not available is an error rather than a silent fallback.

    Parameters
    ----------
    device : str or torch.device
        "auto", "cpu", "cuda", "cuda:N", "mps" or a :class:`torch.device`.

    Returns
    -------
    torch.device
        The device, with its index filled in for CUDA.

    Raises
    ------
    ValueError
        If ``device`` is malformed or names a device that is not available.

    Examples
    --------
    >>> from neurovae.training import resolve_device
    >>> resolve_device("cpu")
    device(type='cpu')
    """
    if isinstance(device, str) and device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(
            f"device must be 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'; got {device!r}"
        ) from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"device={device!r} but CUDA is not available here")
        index = dev.index if dev.index is not None else torch.cuda.current_device()
        if index >= torch.cuda.device_count():
            raise ValueError(
                f"device={device!r} but only {torch.cuda.device_count()} CUDA "
                "device(s) are visible"
            )
        return torch.device("cuda", index)
    if dev.type == "mps":
        mps = getattr(torch.backends, "mps", None)
        if mps is None or not mps.is_available():
            raise ValueError(f"device={device!r} but MPS is not available here")
    return dev


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` ("32": none, "bf16": bfloat16).

    Parameters
    ----------
    device : torch.device
        Device the computation runs on.
    precision : {"32", "bf16"}
        "32" runs in float32 (a no-op context); "bf16" autocasts eligible
        operations (matrix products, convolutions) to bfloat16.

    Returns
    -------
    contextlib.AbstractContextManager
        The context to run the forward pass in.

    Raises
    ------
    ValueError
        If ``precision`` is not in :data:`PRECISIONS`.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import autocast
    >>> layer, x = torch.nn.Linear(4, 2), torch.zeros(3, 4)
    >>> with autocast(torch.device("cpu"), "bf16"):
    ...     y = layer(x)
    >>> y.dtype, y.shape
    (torch.bfloat16, torch.Size([3, 2]))
    >>> with autocast(torch.device("cpu"), "32"):
    ...     y = layer(x)
    >>> y.dtype
    torch.float32
    """
    if precision == "32":
        return contextlib.nullcontext()
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


_RNG_LOCK = threading.Lock()


@contextlib.contextmanager
def local_rng(seed: int) -> Iterator[None]:
    """Seed torch's global CPU generator for a block, then restore it.

    For code that can only draw from the global generator, such as the weight
    initialisation of ``torch.nn`` layers: it becomes deterministic under
    ``seed`` and the caller's random state is left as it was. Blocks are
    serialised by a lock, so concurrent fits in threads do not interleave
    their seeds. Keep the block short (build modules on the CPU inside it);
    training draws from explicit generators instead.

    Parameters
    ----------
    seed : int
        Seed of the global CPU generator inside the block.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import local_rng
    >>> with local_rng(0):
    ...     a = torch.randn(2)
    >>> with local_rng(0):
    ...     b = torch.randn(2)
    >>> bool(torch.equal(a, b))
    True
    """
    with _RNG_LOCK, torch.random.fork_rng(devices=[]):
        torch.random.default_generator.manual_seed(seed)
        yield
