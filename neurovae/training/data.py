"""Minibatches for the engine.

In-memory tensors are batched by slicing a seeded permutation, which is what a
hand-written torch loop does and several times faster than a ``DataLoader``
over a ``TensorDataset`` (no per-sample indexing or collation). Data that does
not fit in memory comes from a ``Dataset`` read by a ``DataLoader``, with the
same seeded permutation, so both give the same batches in the same order.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch


class Shard(NamedTuple):
    """The part of one global batch that one process trains on.

    Attributes
    ----------
    positions : torch.Tensor of int64
        Positions, in the global batch, of the samples of the local batch.
    n_local : int
        Samples of the global batch held by this process. 0 when the global
        batch has fewer samples than there are processes: the local batch
        then holds one stand-in sample (``positions`` is ``[0]``) whose loss
        is weighted by 0, so that every process still takes part in the
        step.
    n_global : int
        Size of the global batch.
    """

    positions: torch.Tensor
    n_local: int
    n_global: int


def _shard(n_parts: int, part_size: int, rank: int, world_size: int) -> Shard:
    """This process's share of a global batch made of ``n_parts`` equal
    parts (the groups of a balanced batch, one part otherwise), each split
    in ``world_size`` contiguous ranges that differ in size by at most one:
    the process of rank ``r`` takes range ``r`` of every part, so each
    process holds the same share of every group."""
    base, extra = divmod(part_size, world_size)
    start = rank * base + min(rank, extra)
    count = base + (rank < extra)
    n_global = n_parts * part_size
    if count == 0:
        return Shard(torch.zeros(1, dtype=torch.long), 0, n_global)
    positions = torch.cat(
        [
            torch.arange(p * part_size + start, p * part_size + start + count)
            for p in range(n_parts)
        ]
    )
    return Shard(positions, n_parts * count, n_global)


def _part_sizes(n: int, batch_size: int) -> list[int]:
    """Sizes of the consecutive batches of a pass over ``n`` items."""
    return [min(batch_size, n - start) for start in range(0, n, batch_size)]


def _permutation(n: int, shuffle: bool, generator) -> torch.Tensor | None:
    """The order of one pass: a fresh permutation, or None for in order."""
    return torch.randperm(n, generator=generator) if shuffle else None


def _shards(balanced, n_samples: int, batch_size: int, shard) -> list[Shard]:
    """The :class:`Shard` of each batch of a pass (see ``TensorBatches``)."""
    rank, world_size = (0, 1) if shard is None else shard
    if balanced is not None:
        n_parts, sizes = balanced.n_parts, _part_sizes(balanced.n_max, batch_size)
    else:
        n_parts, sizes = 1, _part_sizes(n_samples, batch_size)
    return [_shard(n_parts, size, rank, world_size) for size in sizes]


def _local(selection, positions: torch.Tensor, home: torch.device):
    """The entries ``positions`` of a batch's selection (slice or indices)."""
    if isinstance(selection, slice):
        return torch.arange(selection.start, selection.stop, device=home)[
            positions.to(home)
        ]
    return selection[positions.to(selection.device)]


class _Balanced:
    """Shuffled index batches that draw every group at the same rate.

    Each step takes the same number of samples from every group: one pass
    goes once through the largest group in a fresh random order, while
    smaller groups are cycled through (a fresh permutation each time round),
    so that both groups of a contrastive model are seen equally often however
    unequal their sizes. A batch holds ``batch_size`` samples of each group
    (fewer in the last step), group after group.
    """

    def __init__(self, groups: torch.Tensor, batch_size: int) -> None:
        groups = torch.as_tensor(groups).cpu()
        self.members = [
            torch.nonzero(groups == g).flatten() for g in torch.unique(groups)
        ]
        self.n_max = max(len(m) for m in self.members)
        self.batch_size = batch_size
        self.n_parts = len(self.members)

    def __len__(self) -> int:
        return -(-self.n_max // self.batch_size)

    def batches(self, generator) -> Iterator[torch.Tensor]:
        streams = []
        for members in self.members:
            n_rounds = -(-self.n_max // len(members))
            perms = [
                torch.randperm(len(members), generator=generator)
                for _ in range(n_rounds)
            ]
            streams.append(members[torch.cat(perms)])
        bs = self.batch_size
        for start in range(0, self.n_max, bs):
            stop = min(start + bs, self.n_max)
            yield torch.cat([stream[start:stop] for stream in streams])


class TensorBatches:
    """Iterate over minibatches of aligned tensors.

    Parameters
    ----------
    tensors : tuple of torch.Tensor
        Tensors sharing their first dimension (samples).
    batch_size : int
        Samples per batch; the last batch may be smaller.
    shuffle : bool
        Draw a fresh permutation for every pass.
    generator : torch.Generator, optional
        Generator of the permutation (CPU), for reproducible shuffling.
    device : torch.device, optional
        Where batches are moved (non-blocking) if the tensors live elsewhere.
    groups : torch.Tensor of shape (n_samples,), optional
        Group of each sample (any integer or bool codes). When given and
        ``shuffle`` is True, every batch holds ``batch_size`` samples of
        *each* group (fewer in the last), so that all groups are seen at the
        same rate: a pass goes once through the largest group and cycles
        through the smaller ones. Unshuffled passes ignore it.
    shard : tuple of int (rank, world_size), optional
        Distributed training: iterate over this process's share of every
        batch (see :meth:`shards`). ``batch_size`` stays the size of the
        *global* batch, and every process draws the same permutation from
        an identically seeded ``generator``, so that together the processes
        see exactly the batches of one process.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import TensorBatches
    >>> batches = TensorBatches((torch.arange(5.0),), batch_size=2, shuffle=False)
    >>> [b[0].tolist() for b in batches]
    [[0.0, 1.0], [2.0, 3.0], [4.0]]
    >>> len(batches)
    3

    With groups, each batch takes two samples of each group; the group of
    two samples is cycled through while the group of four is passed once:

    >>> groups = torch.tensor([0, 0, 0, 0, 1, 1])
    >>> batches = TensorBatches((groups,), 2, shuffle=True, groups=groups,
    ...                         generator=torch.Generator().manual_seed(0))
    >>> [b[0].tolist() for b in batches]
    [[0, 0, 1, 1], [0, 0, 1, 1]]

    The share of the second of two processes: half of every batch, and a
    stand-in sample of weight 0 where a batch has a single sample:

    >>> batches = TensorBatches((torch.arange(5.0),), 2, shard=(1, 2))
    >>> [b[0].tolist() for b in batches]
    [[1.0], [3.0], [4.0]]
    >>> [(s.n_local, s.n_global) for s in batches.shards()]
    [(1, 2), (1, 2), (0, 1)]
    """

    def __init__(
        self,
        tensors: tuple[torch.Tensor, ...],
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        groups: torch.Tensor | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.tensors = tuple(tensors)
        self.n_samples = int(self.tensors[0].shape[0])
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.generator = generator
        self.device = device
        self._balanced = None
        if groups is not None and shuffle:
            self._balanced = _Balanced(groups, self.batch_size)
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))

    def __len__(self) -> int:
        if self._balanced is not None:
            return len(self._balanced)
        return -(-self.n_samples // self.batch_size)

    def shards(self) -> list[Shard]:
        """This process's :class:`Shard` of each batch of a pass, in order.

        The same for every pass (only the samples change). Without ``shard``,
        each batch is whole.
        """
        return _shards(self._balanced, self.n_samples, self.batch_size, self.shard)

    def _selections(self, home: torch.device):
        """Index tensors (or slices) of the samples of each batch of a pass."""
        if self._balanced is not None:
            for sel in self._balanced.batches(self.generator):
                yield sel if home.type == "cpu" else sel.to(home)
            return
        n, bs = self.n_samples, self.batch_size
        perm = _permutation(n, self.shuffle, self.generator)
        if perm is not None and home.type != "cpu":
            perm = perm.to(home)
        for start in range(0, n, bs):
            yield slice(start, start + bs) if perm is None else perm[start : start + bs]

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        home = self.tensors[0].device
        move = self.device is not None and home != self.device
        shards = self.shards() if self.shard is not None else None
        for i, sel in enumerate(self._selections(home)):
            if shards is not None:
                sel = _local(sel, shards[i].positions, home)
            batch = tuple(t[sel] for t in self.tensors)
            if move:
                batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            yield batch


class _BatchSampler(torch.utils.data.Sampler):
    """Index batches of :class:`TensorBatches`' permutation, for a DataLoader."""

    def __init__(
        self,
        n_samples: int,
        batch_size: int,
        shuffle: bool,
        generator,
        groups=None,
        shard=None,
    ):
        self.n_samples, self.batch_size = n_samples, batch_size
        self.shuffle, self.generator = shuffle, generator
        self._balanced = None
        if groups is not None and shuffle:
            self._balanced = _Balanced(groups, batch_size)
        self.shard = shard

    def shards(self) -> list[Shard]:
        return _shards(self._balanced, self.n_samples, self.batch_size, self.shard)

    def __iter__(self) -> Iterator[list[int]]:
        if self.shard is None:
            yield from self._global()
            return
        for batch, shard in zip(self._global(), self.shards()):
            yield [batch[i] for i in shard.positions.tolist()]

    def __len__(self) -> int:
        if self._balanced is not None:
            return len(self._balanced)
        return -(-self.n_samples // self.batch_size)

    def _global(self) -> Iterator[list[int]]:
        if self._balanced is not None:
            for sel in self._balanced.batches(self.generator):
                yield sel.tolist()
            return
        n, bs = self.n_samples, self.batch_size
        perm = _permutation(n, self.shuffle, self.generator)
        order = list(range(n)) if perm is None else perm.tolist()
        for start in range(0, n, bs):
            yield order[start : start + bs]


class DatasetBatches:
    """Iterate over minibatches of a ``torch`` dataset through a DataLoader.

    The batches are those :class:`TensorBatches` would give for the same
    data, batch size and generator: the same samples in the same order. Items
    are read by ``num_workers`` worker processes (kept alive between passes)
    while the model trains.

    Parameters
    ----------
    dataset : torch.utils.data.Dataset
        A map-style dataset whose items are tuples of tensors.
    batch_size : int
        Samples per batch; the last batch may be smaller.
    shuffle : bool
        Draw a fresh permutation for every pass.
    generator : torch.Generator, optional
        Generator of the permutation (CPU).
    device : torch.device, optional
        Where batches are moved (non-blocking, from pinned memory on CUDA).
    num_workers : int, default=0
        Worker processes reading items; 0 reads them in this process.
    collate_fn : callable, optional
        How the ``DataLoader`` assembles a batch (default: stacking items).
    groups : torch.Tensor of shape (n_samples,), optional
        Group of each item; shuffled passes then draw every group at the
        same rate, as :class:`TensorBatches` does.
    shard : tuple of int (rank, world_size), optional
        Distributed training: read and iterate over this process's share of
        every global batch only, as :class:`TensorBatches` does (items of
        the other shares are never read here).

    Examples
    --------
    >>> import torch
    >>> from torch.utils.data import TensorDataset
    >>> from neurovae.training import DatasetBatches
    >>> dataset = TensorDataset(torch.arange(5.0))
    >>> batches = DatasetBatches(dataset, batch_size=2, shuffle=False)
    >>> [b[0].tolist() for b in batches]
    [[0.0, 1.0], [2.0, 3.0], [4.0]]
    """

    def __init__(
        self,
        dataset: torch.utils.data.Dataset,
        batch_size: int,
        shuffle: bool = False,
        generator: torch.Generator | None = None,
        device: torch.device | None = None,
        num_workers: int = 0,
        collate_fn=None,
        groups: torch.Tensor | None = None,
        shard: tuple[int, int] | None = None,
    ) -> None:
        self.dataset = dataset
        self.n_samples = len(dataset)
        self.batch_size = int(batch_size)
        self.generator = generator
        self.device = device
        pin = device is not None and device.type == "cuda"
        self.shard = None if shard is None else (int(shard[0]), int(shard[1]))
        self._sampler = _BatchSampler(
            self.n_samples, self.batch_size, shuffle, generator, groups, self.shard
        )
        self.loader = torch.utils.data.DataLoader(
            dataset,
            batch_sampler=self._sampler,
            num_workers=num_workers,
            collate_fn=collate_fn,
            pin_memory=pin,
            persistent_workers=num_workers > 0,
            # the loader draws its workers' base seed from this generator
            # instead of torch's global one (ours read files, draw nothing)
            generator=torch.Generator(),
        )

    def __len__(self) -> int:
        return len(self.loader)

    def shards(self) -> list[Shard]:
        """This process's :class:`Shard` of each batch of a pass, in order
        (see :meth:`TensorBatches.shards`)."""
        return self._sampler.shards()

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        for batch in self.loader:
            batch = tuple(batch)
            if self.device is not None:
                batch = tuple(t.to(self.device, non_blocking=True) for t in batch)
            yield batch
