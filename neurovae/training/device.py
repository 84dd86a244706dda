"""Devices, numerical precision and local random state."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch

#: Accepted ``precision`` values: "32" (float32), "bf16" (bfloat16 autocast)
#: and "16" (float16 autocast with a gradient scaler, CUDA only).
PRECISIONS = ("32", "bf16", "16")


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
    """Autocast context for ``precision`` ("32": none, "bf16", "16").

    Parameters
    ----------
    device : torch.device
        Device the computation runs on.
    precision : {"32", "bf16", "16"}
        "32" runs in float32 (a no-op context); "bf16" autocasts eligible
        operations (matrix products, convolutions) to bfloat16 on every
        device; "16" autocasts them to float16 on CUDA (training needs a
        gradient scaler too, see :func:`make_scaler`) and runs in float32
        on other devices: float16 is slow on a CPU, and there it only
        happens at inference, for a model trained on a GPU.

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
    if precision == "16":
        if device.type != "cuda":
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=torch.float16)
    raise ValueError(f"precision must be one of {PRECISIONS}; got {precision!r}")


def make_scaler(device: torch.device, precision: str) -> torch.amp.GradScaler | None:
    """The gradient scaler that training in ``precision`` needs, if any.

    float16 has a narrow range (its smallest normal number is about 6e-5,
    its largest 65504): small gradients underflow to zero. Training with
    ``precision="16"`` therefore multiplies the loss by a large scale before
    the backward pass and divides the gradients by it before the step; the
    :class:`torch.amp.GradScaler` returned here lowers the scale (and skips
    the step) when the scaled gradients overflow, and raises it again after
    a run of finite steps. The other precisions need no scaler (bfloat16 has
    float32's range).

    Parameters
    ----------
    device : torch.device
        Device the training runs on.
    precision : str
        The ``precision`` parameter.

    Returns
    -------
    torch.amp.GradScaler or None
        A CUDA gradient scaler for "16"; None otherwise.

    Raises
    ------
    ValueError
        If ``precision`` is "16" and ``device`` is not a CUDA device.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import make_scaler
    >>> make_scaler(torch.device("cpu"), "bf16") is None
    True
    >>> make_scaler(torch.device("cpu"), "16")
    Traceback (most recent call last):
    ...
    ValueError: precision='16' needs a CUDA device; use 'bf16' on CPU
    """
    if precision != "16":
        return None
    if device.type != "cuda":
        where = "CPU" if device.type == "cpu" else f"device {device.type!r}"
        raise ValueError(f"precision='16' needs a CUDA device; use 'bf16' on {where}")
    return torch.amp.GradScaler("cuda")


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
