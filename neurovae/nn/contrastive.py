"""The contrastive VAE: shared and salient latent spaces, and its discriminator."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from neurovae.nn.latent import GaussianLatent, kl_standard_normal
from neurovae.nn.noise import standard_normal


class PairDiscriminator(nn.Module):
    """Tell true (salient, shared) code pairs from pairs with permuted shared codes.

    The density-ratio trick of FactorVAE (Kim & Mnih 2018) as used by the
    contrastive VAE (Abid & Zou 2019): trained to output logit > 0 for pairs
    ``(s_i, z_i)`` of one sample and logit < 0 for ``(s_i, z_pi(i))`` whose
    shared codes are permuted across the batch, its logit on true pairs
    estimates ``log q(s, z) / (q(s) q(z))``, the total correlation between
    the two spaces.

    Parameters
    ----------
    n_salient : int
        Size of the salient codes.
    n_shared : int
        Size of the shared codes.
    hidden_layer_sizes : tuple of int, default=(64, 64)
        Widths of the hidden layers (LeakyReLU activations).

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import PairDiscriminator
    >>> disc = PairDiscriminator(n_salient=2, n_shared=3)
    >>> s, z = torch.zeros(5, 2), torch.zeros(5, 3)
    >>> disc(s, z).shape
    torch.Size([5])
    >>> loss = disc.loss(s, z, torch.Generator().manual_seed(0))
    >>> loss.shape  # binary cross-entropy of true and permuted pairs
    torch.Size([])
    """

    def __init__(
        self,
        n_salient: int,
        n_shared: int,
        hidden_layer_sizes: tuple[int, ...] = (64, 64),
    ) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        width = n_salient + n_shared
        for size in hidden_layer_sizes:
            layers += [nn.Linear(width, size), nn.LeakyReLU(0.2)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, s: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        """Logit that each ``(s_i, z_i)`` is a true pair, shape ``(n,)``."""
        return self.net(torch.cat([s, z], dim=1)).squeeze(1)

    def loss(
        self,
        s: torch.Tensor,
        z: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Binary cross-entropy: true pairs are 1, permuted pairs are 0.

        The shared codes are permuted with ``generator`` (a derangement is
        not enforced: with ``n`` samples a pair stays true with probability
        ``1/n``, which only adds a little label noise).
        """
        perm = torch.randperm(len(z), generator=generator, device=z.device)
        true, permuted = self(s, z), self(s, z[perm])
        return F.binary_cross_entropy_with_logits(
            true, torch.ones_like(true)
        ) + F.binary_cross_entropy_with_logits(permuted, torch.zeros_like(permuted))


class ContrastiveVAEModule(nn.Module):
    """A contrastive VAE (Abid & Zou 2019; Aglinskas et al. 2022).

    A shared encoder, applied to every sample, gives the posterior over the
    shared code ``z``; a salient encoder gives the posterior over the salient
    code ``s``. One decoder maps ``[z, s]`` to the sample. Target samples use
    both codes; background samples are decoded with ``s = 0`` and their
    salient posterior is not used, so that ``s`` must hold what only the
    target group has.

    The training batch is ``(x, target)``, with ``target`` a bool tensor
    marking the target samples. The objective, averaged over the samples of
    the batch, is the negative log-likelihood plus ``beta`` times the KL of
    the shared posterior (all samples) and of the salient posterior (target
    samples), plus ``gamma`` times the total correlation between ``s`` and
    ``z`` on the target samples as estimated by :attr:`discriminator`. The
    discriminator is not trained by this objective: its parameters are
    owned by :class:`~neurovae.training.DiscriminatorHook`, which minimises
    :meth:`discriminator_loss` with its own optimiser on detached codes.

    With ``deterministic=True`` the codes are the posterior means (no
    sampling) and the KL is replaced by the L2 penalty ``0.5 * ||code||^2``:
    a regularised autoencoder.

    Parameters
    ----------
    shared_encoder, salient_encoder : nn.Module
        Map ``(n, *sample_shape)`` to features of any shape.
    decoder : nn.Module
        Maps ``(n, n_shared + n_salient)`` codes ``[z, s]`` to the raw output.
    shared_latent, salient_latent : GaussianLatent
        Posterior heads of the shared and salient codes.
    likelihood : nn.Module
        Observation model with ``log_prob(x, out)`` and ``mean(out)``.
    discriminator : PairDiscriminator or None, default=None
        Total-correlation estimator; None turns the penalty off.
    deterministic : bool, default=False
        Regularised autoencoder instead of a VAE.

    Attributes
    ----------
    generator : torch.Generator or None
        Source of the reparameterisation noise (training mode).
    eval_noise : torch.Tensor of shape (1, n_shared + n_salient)
        Fixed noise used in eval mode, so that scores are deterministic.
    beta : float
        Weight of the KL terms (or of the L2 penalty), set by the engine.
    gamma : float
        Weight of the total-correlation penalty.
    last_codes : tuple of torch.Tensor or None
        Detached ``(s, z)`` codes of the target samples of the last training
        batch, for :meth:`discriminator_loss`.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import (ContrastiveVAEModule, GaussianLatent,
    ...     PairDiscriminator, make_backbone, make_likelihood)
    >>> enc_z, dec = make_backbone("mlp", (6,), 3, hidden_layer_sizes=(8,))
    >>> enc_s, _ = make_backbone("mlp", (6,), 3, hidden_layer_sizes=(8,))
    >>> cvae = ContrastiveVAEModule(
    ...     enc_z, enc_s, dec, GaussianLatent(8, 2), GaussianLatent(8, 1),
    ...     make_likelihood("gaussian", (6,)), PairDiscriminator(1, 2))
    >>> x, target = torch.zeros(4, 6), torch.tensor([True, True, False, False])
    >>> sorted(cvae.loss((x, target)))
    ['kl', 'loss', 'recon', 'tc']
    >>> mu, logvar = cvae.encode(x)  # posterior over [z, s]
    >>> mu.shape, cvae.decode(mu).shape
    (torch.Size([4, 3]), torch.Size([4, 6]))
    >>> cvae.eval().elbo_groups(x).shape  # background and target ELBO
    torch.Size([4, 2])
    """

    def __init__(
        self,
        shared_encoder: nn.Module,
        salient_encoder: nn.Module,
        decoder: nn.Module,
        shared_latent: GaussianLatent,
        salient_latent: GaussianLatent,
        likelihood: nn.Module,
        discriminator: PairDiscriminator | None = None,
        deterministic: bool = False,
    ) -> None:
        super().__init__()
        self.shared_encoder = shared_encoder
        self.salient_encoder = salient_encoder
        self.decoder = decoder
        self.shared_latent = shared_latent
        self.salient_latent = salient_latent
        self.likelihood = likelihood
        self.discriminator = discriminator
        self.deterministic = bool(deterministic)
        self.generator: torch.Generator | None = None
        self.register_buffer("eval_noise", torch.randn(1, self.n_components))
        self.beta = 1.0
        self.gamma = 1.0
        self.last_codes: tuple[torch.Tensor, torch.Tensor] | None = None

    @property
    def n_shared(self) -> int:
        return self.shared_latent.n_components

    @property
    def n_salient(self) -> int:
        return self.salient_latent.n_components

    @property
    def n_components(self) -> int:
        """Size of the full code ``[z, s]``."""
        return self.n_shared + self.n_salient

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the posterior over ``[z, s]``.

        The two encoders are independent given ``x``, so the joint posterior
        is the diagonal Gaussian of the concatenated codes.
        """
        mu_z, logvar_z = self.shared_latent(self.shared_encoder(x))
        mu_s, logvar_s = self.salient_latent(self.salient_encoder(x))
        return torch.cat([mu_z, mu_s], dim=1), torch.cat([logvar_z, logvar_s], dim=1)

    def decode(self, code: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | z, s) for codes ``[z, s]``."""
        return self.likelihood.mean(self.decoder(code))

    def _noise(self, mu: torch.Tensor, eps: torch.Tensor | None) -> torch.Tensor:
        if eps is not None:
            return eps
        if self.training:
            return standard_normal(
                mu.shape, generator=self.generator, device=mu.device, dtype=mu.dtype
            )
        return self.eval_noise.to(mu.dtype).expand_as(mu)

    def _regulariser(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        """Per-sample KL to N(0, I), or the L2 penalty when deterministic."""
        if self.deterministic:
            return 0.5 * mu.float().pow(2).sum(dim=1)
        return kl_standard_normal(mu.float(), logvar.float())

    def terms(
        self,
        x: torch.Tensor,
        target: torch.Tensor,
        eps: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-sample negative log-likelihood, KL (or penalty) and codes.

        ``target`` (bool, shape ``(n,)``) marks the samples decoded with their
        salient code; the others are decoded with ``s = 0`` and their KL
        counts the shared code only. Returns ``(nll, kl, code)`` where
        ``code`` is the ``[z, s]`` that was decoded.
        """
        mu, logvar = self.encode(x)
        return self._decoded_terms(x, mu, logvar, target, eps)

    def _decoded_terms(self, x, mu, logvar, target, eps):
        """:meth:`terms` given the posterior of ``x`` (encoded once)."""
        if self.deterministic:
            code = mu
        else:
            code = mu + torch.exp(0.5 * logvar) * self._noise(mu, eps)
        shared = torch.arange(code.shape[1], device=code.device) < self.n_shared
        code = code * (shared | target[:, None])  # s = 0 for background samples
        nll = -self.likelihood.log_prob(x, self.decoder(code))
        k = self.n_shared
        kl = self._regulariser(mu[:, :k], logvar[:, :k])
        kl_s = self._regulariser(mu[:, k:], logvar[:, k:])
        kl = kl + torch.where(target, kl_s, torch.zeros_like(kl_s))
        return nll, kl, code

    def loss(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Training objective and its terms (``tc`` only with a discriminator)."""
        x, target = batch[0], batch[1].bool()
        nll, kl, code = self.terms(x, target)
        recon, kl = nll.mean(), kl.mean()
        objective = recon + self.beta * kl
        out = {"loss": objective, "recon": recon, "kl": kl}
        if self.discriminator is not None:
            s, z = code[target, self.n_shared :], code[target, : self.n_shared]
            if len(s) >= 1:
                tc = self.discriminator(s.float(), z.float()).mean()
            else:  # no target sample in the batch
                tc = code.new_zeros((), dtype=torch.float32)
            out["loss"] = objective + self.gamma * tc
            out["tc"] = tc
            if self.training:
                self.last_codes = (s.detach().float(), z.detach().float())
        return out

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return self.loss(batch)

    def discriminator_loss(self) -> torch.Tensor | None:
        """The discriminator's loss on the codes of the last training batch.

        The codes are detached, so this loss trains the discriminator only:
        none of its gradient reaches the encoders. None when there is nothing
        to train on (no discriminator, or fewer than two target samples).
        """
        if self.discriminator is None or self.last_codes is None:
            return None
        s, z = self.last_codes
        self.last_codes = None
        if len(s) < 2:
            return None
        return self.discriminator.loss(s, z, self.generator)

    def elbo(
        self,
        x: torch.Tensor,
        target: torch.Tensor | None = None,
        eps: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-sample ELBO; samples not marked ``target`` are scored as
        background (``s = 0``). ``target=None`` scores every sample as target.
        """
        if target is None:
            target = torch.ones(len(x), dtype=torch.bool, device=x.device)
        nll, kl, _ = self.terms(x, target.bool(), eps)
        return -(nll + kl)

    def elbo_groups(self, x: torch.Tensor) -> torch.Tensor:
        """ELBO of each sample as background (column 0) and as target (1)."""
        mu, logvar = self.encode(x)  # once: only the decoding differs
        ones = torch.ones(len(x), dtype=torch.bool, device=x.device)
        elbos = []
        for target in (~ones, ones):
            nll, kl, _ = self._decoded_terms(x, mu, logvar, target, None)
            elbos.append(-(nll + kl))
        return torch.stack(elbos, dim=1)
