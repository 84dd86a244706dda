"""Optimiser factory used by the engine."""

from __future__ import annotations

from collections.abc import Iterable

import torch

#: Optimiser classes by the name that :func:`make_optimizer` accepts.
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

    Parameters
    ----------
    name : {"adam", "adamw", "sgd", "adamax"}
        Optimiser, a key of :data:`OPTIMIZERS`.
    params : iterable of torch.nn.Parameter
        Parameters to optimise.
    learning_rate : float
        Learning rate.
    weight_decay : float, default=0.0
        Weight decay (decoupled for "adamw", L2 for the others).

    Returns
    -------
    torch.optim.Optimizer

    Raises
    ------
    ValueError
        If ``name`` is not a key of :data:`OPTIMIZERS`.

    Examples
    --------
    >>> import torch
    >>> from neurovae.training import make_optimizer
    >>> layer = torch.nn.Linear(2, 1)
    >>> opt = make_optimizer("adamw", layer.parameters(), 1e-3, weight_decay=0.01)
    >>> type(opt).__name__, opt.defaults["lr"], opt.defaults["weight_decay"]
    ('AdamW', 0.001, 0.01)
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
