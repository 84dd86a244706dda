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

    Calling the module on encoder features ``h`` of shape ``(n, ...)``
    flattens them and returns ``(mu, logvar)``, each of shape
    ``(n, n_components)``; ``logvar`` is clamped to a range in which
    ``exp(logvar)`` cannot overflow.

    Parameters
    ----------
    in_features : int
        Size of the (flattened) encoder output.
    n_components : int
        Dimension of the latent space.

    Attributes
    ----------
    n_components : int
        Dimension of the latent space.
    linear : torch.nn.Linear
        The layer producing ``mu`` and ``logvar`` side by side.

    See Also
    --------
    kl_standard_normal : KL divergence of the posterior to the prior.
    infer_output_size : Size ``in_features`` after any encoder.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import GaussianLatent
    >>> head = GaussianLatent(in_features=6, n_components=2)
    >>> mu, logvar = head(torch.zeros(3, 2, 3))  # features (n, 2, 3), flattened
    >>> mu.shape, logvar.shape
    (torch.Size([3, 2]), torch.Size([3, 2]))
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

    Parameters
    ----------
    mu : torch.Tensor of shape (n, n_components)
        Posterior means.
    logvar : torch.Tensor of shape (n, n_components)
        Posterior log-variances.

    Returns
    -------
    torch.Tensor of shape (n,)
        KL divergence of each sample's posterior to the prior, in nats.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import kl_standard_normal
    >>> kl_standard_normal(torch.zeros(2, 3), torch.zeros(2, 3))  # q equals prior
    tensor([0., 0.])
    >>> kl_standard_normal(torch.ones(1, 3), torch.zeros(1, 3))  # 3 * 0.5 * 1**2
    tensor([1.5000])
    """
    return 0.5 * (mu.pow(2) + logvar.exp() - 1.0 - logvar).sum(dim=1)
