"""Per-sample training noise that does not depend on how a batch is split.

Under distributed training every process computes the loss of a slice of
each global batch. For its run to do the same arithmetic as a one-process run
on the same global batch, the reparameterisation noise of a sample must not
depend on which process holds it. Modules therefore draw per-sample noise
through :func:`standard_normal`: outside a :func:`batch_shard` block it is
``torch.randn``; inside one, every process draws the noise of the *whole*
global batch from its (identically seeded) generator and keeps the rows of
its own samples, so all generators stay in step and every sample gets the
noise it would get in one process.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator, Sequence

import torch

# (positions of the local samples in the global batch, global batch size)
_SHARD: contextvars.ContextVar[tuple[torch.Tensor, int] | None] = (
    contextvars.ContextVar("neurovae_batch_shard", default=None)
)


@contextlib.contextmanager
def batch_shard(positions: torch.Tensor, n_global: int) -> Iterator[None]:
    """Declare the local batch a slice of a larger, global batch.

    Within the block, :func:`standard_normal` draws the noise of ``n_global``
    samples and returns the rows ``positions``. The block is local to the
    thread (a context variable), so concurrent fits do not interfere.

    Parameters
    ----------
    positions : torch.Tensor of int64, shape (n_local,)
        Position in the global batch of each sample of the local batch.
    n_global : int
        Size of the global batch.

    Examples
    --------
    Two halves of a batch get the noise of the whole batch, row for row:

    >>> import torch
    >>> from neurovae.nn import batch_shard, standard_normal
    >>> def draw(n):
    ...     return standard_normal((n, 3), torch.Generator().manual_seed(0))
    >>> whole = draw(4)
    >>> with batch_shard(torch.tensor([2, 3]), 4):
    ...     second_half = draw(2)
    >>> bool(torch.equal(second_half, whole[2:]))
    True
    """
    token = _SHARD.set((torch.as_tensor(positions, dtype=torch.long), int(n_global)))
    try:
        yield
    finally:
        _SHARD.reset(token)


def standard_normal(
    shape: Sequence[int],
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """Standard-normal noise with one row per sample of the batch.

    ``torch.randn(shape, generator=generator, ...)``, except inside a
    :func:`batch_shard` block whose local batch has ``shape[0]`` samples:
    the noise of the whole global batch is drawn and the local rows kept.

    Parameters
    ----------
    shape : sequence of int
        ``(n_samples, ...)``.
    generator : torch.Generator or None, default=None
        Where the noise is drawn from (None: torch's global generator).
    device, dtype : optional
        As for ``torch.randn``.

    Returns
    -------
    torch.Tensor of shape ``shape``

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import standard_normal
    >>> standard_normal((2, 3), torch.Generator().manual_seed(0)).shape
    torch.Size([2, 3])
    """
    shape = tuple(shape)
    shard = _SHARD.get()
    if shard is None or not shape or shape[0] != len(shard[0]):
        return torch.randn(shape, generator=generator, device=device, dtype=dtype)
    positions, n_global = shard
    full = torch.randn(
        (n_global, *shape[1:]), generator=generator, device=device, dtype=dtype
    )
    return full[positions.to(full.device)]
