"""Diagonal Gaussian posterior head and its KL divergence to N(0, I)."""

from __future__ import annotations

import torch
from torch import nn

# Bounds on the posterior log-variance: wide enough never to bind in a healthy
# model, tight enough that exp() cannot overflow in float32 or bfloat16.
LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


class GaussianLatent(nn.Module):
    """Map encoder features to the mean and log-variance of q(z | x).

    Parameters
    ----------
    in_features : int
        Size of the (flattened) encoder output.
    n_components : int
        Dimension of the latent space.
    """

    def __init__(self, in_features: int, n_components: int) -> None:
        super().__init__()
        self.n_components = n_components
        self.linear = nn.Linear(in_features, 2 * n_components)

    def forward(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.linear(h.flatten(1)).chunk(2, dim=1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)


def kl_standard_normal(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over the latent dimensions.

    Returns one value per sample (shape ``(n,)``), in nats.
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
