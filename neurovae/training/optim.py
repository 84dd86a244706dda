"""Optimiser factory used by the engine."""

from __future__ import annotations

from collections.abc import Iterable

import torch

OPTIMIZERS = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
    "sgd": torch.optim.SGD,
    "adamax": torch.optim.Adamax,
}


def make_optimizer(
    name: str,
    params: Iterable[torch.nn.Parameter],
    learning_rate: float,
    weight_decay: float = 0.0,
) -> torch.optim.Optimizer:
    """Build optimiser ``name`` ("adam", "adamw", "sgd", "adamax").

    SGD uses Nesterov momentum 0.9, the usual choice for neural networks.

    Examples
    --------
    >>> layer = torch.nn.Linear(2, 1)
    >>> make_optimizer("adamw", layer.parameters(), 1e-3).__class__.__name__
    'AdamW'
    """
    try:
        cls = OPTIMIZERS[name]
    except KeyError:
        raise ValueError(
            f"unknown optimizer {name!r}; use one of {sorted(OPTIMIZERS)}"
        ) from None
    kwargs = {"lr": learning_rate, "weight_decay": weight_decay}
    if name == "sgd":
        kwargs.update(momentum=0.9, nesterov=True)
    return cls(params, **kwargs)
