"""The VAE model: encoder, Gaussian latent head, decoder and likelihood."""

from __future__ import annotations

import torch
from torch import nn

from neurovae.nn.latent import GaussianLatent, kl_standard_normal
from neurovae.nn.noise import standard_normal


class VAEModule(nn.Module):
    """A variational autoencoder with a diagonal Gaussian posterior.

    The training engine calls :meth:`loss` (also reachable as ``forward``, so
    that a ``DistributedDataParallel`` wrapper sees it) with a batch tuple
    ``(x,)`` and receives a dict of scalar tensors whose ``"loss"`` entry is
    minimised.

    Parameters
    ----------
    encoder : nn.Module
        Maps ``(n, *sample_shape)`` to features of any shape.
    decoder : nn.Module
        Maps ``(n, n_components)`` to the raw output ``(n, *sample_shape)``.
    latent : GaussianLatent
        Maps flattened encoder features to the posterior mean and log-variance.
    likelihood : nn.Module
        Observation model with ``log_prob(x, out)`` and ``mean(out)``.

    Attributes
    ----------
    generator : torch.Generator or None
        Source of the reparameterisation noise in training mode (on the
        module's device); None draws from torch's global generator.
    eval_noise : torch.Tensor of shape (1, n_components)
        A fixed standard-normal draw (a buffer, saved with the weights) used
        as the reparameterisation noise of every sample in eval mode, so that
        validation losses and scores are deterministic and do not depend on
        which other samples share the batch.
    beta : float
        Weight of the KL term, set by the engine's schedule.
    capacity : float or None
        Target KL in nats (Burgess et al. 2018). When not None the objective is
        ``recon + gamma * |KL - capacity|`` instead of ``recon + beta * KL``.
    gamma : float
        Weight of the capacity constraint.

    See Also
    --------
    make_backbone : Built-in encoder / decoder pairs.
    make_likelihood : Built-in observation models.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import GaussianLatent, VAEModule
    >>> from neurovae.nn import infer_output_size, make_backbone, make_likelihood
    >>> encoder, decoder = make_backbone("mlp", (6,), 2, hidden_layer_sizes=(8,))
    >>> latent = GaussianLatent(infer_output_size(encoder, (6,)), n_components=2)
    >>> vae = VAEModule(encoder, decoder, latent, make_likelihood("gaussian", (6,)))
    >>> x = torch.zeros(4, 6)
    >>> sorted(vae.loss((x,)))  # what the training engine minimises and logs
    ['kl', 'loss', 'recon']
    >>> mu, logvar = vae.encode(x)
    >>> mu.shape, vae.decode(mu).shape
    (torch.Size([4, 2]), torch.Size([4, 6]))
    >>> vae.eval().elbo(x).shape  # one deterministic value per sample
    torch.Size([4])
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        latent: GaussianLatent,
        likelihood: nn.Module,
    ) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.latent = latent
        self.likelihood = likelihood
        self.generator: torch.Generator | None = None
        self.register_buffer("eval_noise", torch.randn(1, latent.n_components))
        self.beta = 1.0
        self.capacity: float | None = None
        self.gamma = 1.0

    @property
    def n_components(self) -> int:
        return self.latent.n_components

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Posterior mean and log-variance of q(z | x)."""
        return self.latent(self.encoder(x))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z): the reconstruction for latent codes ``z``."""
        return self.likelihood.mean(self.decoder(z))

    def terms(
        self, x: torch.Tensor, eps: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample negative log-likelihood and KL for one posterior draw.

        ``eps`` is the standard-normal noise of the reparameterisation. When
        not given it is drawn from :attr:`generator` in training mode and is
        :attr:`eval_noise` for every sample in eval mode.
        """
        mu, logvar = self.encode(x)
        if eps is None:
            if self.training:
                eps = standard_normal(
                    mu.shape, generator=self.generator, device=mu.device, dtype=mu.dtype
                )
            else:
                eps = self.eval_noise.to(mu.dtype).expand_as(mu)
        z = mu + torch.exp(0.5 * logvar) * eps
        nll = -self.likelihood.log_prob(x, self.decoder(z))
        return nll, kl_standard_normal(mu.float(), logvar.float())

    def loss(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Training objective and its terms, averaged over the batch."""
        nll, kl = self.terms(batch[0])
        recon, kl = nll.mean(), kl.mean()
        if self.capacity is None:
            objective = recon + self.beta * kl
        else:
            objective = recon + self.gamma * (kl - self.capacity).abs()
        return {"loss": objective, "recon": recon, "kl": kl}

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return self.loss(batch)

    def elbo(self, x: torch.Tensor, eps: torch.Tensor | None = None) -> torch.Tensor:
        """Per-sample evidence lower bound (one posterior draw, see :meth:`terms`)."""
        nll, kl = self.terms(x, eps)
        return -(nll + kl)
