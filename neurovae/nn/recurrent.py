"""The recurrent VAE: latent dynamics of sequences with a linear transition.

A run ``x_1 .. x_T`` is encoded frame by frame. Each frame's features
``e(x_t)`` (any backbone encoder, applied to all frames of a batch at once)
are combined with the previous latent state into the posterior

    q(h_t | x_t, h_{t-1}) = N(m_t, diag(s_t^2)),
    [m_t, log s_t^2] = W_o silu(W_x e(x_t) + W_h h_{t-1} + b),

with ``h_0 = 0`` as the input of the first step. The prior of the first state
is N(0, I); later states follow the linear-Gaussian transition

    p(h_t | h_{t-1}) = N(h_{t-1} F^T, sigma_h^2 I).

The decoder maps ``h_t + z_s`` to the frame, where ``z_s`` is a per-run
(per-subject) offset: inferred by an amortised encoder from the time average
of the frame features (``"amortized"``, prior N(0, I)), a learned table row
per training run with an L1 penalty (``"table"``), or absent (``None``).

Temporal term (``temporal_loss="kl"``). The negative ELBO of a run is, with
one reparameterised draw ``h~_t`` per step (fed to the next step),

    sum_t -log p(x_t | h~_t + z_s) + KL(q_1 || N(0, I))
          + sum_{t>1} KL(q_t || N(h~_{t-1} F^T, sigma_h^2 I)) + subject term.

``temporal_loss="mse"`` is the squared-error proxy of the reference study:
every ``q_t`` is pulled to N(0, I) by its own KL and the dynamics enter as
``||m_t - m_{t-1} F^T||^2 / (2 sigma_h^2)`` on the posterior means.

The transition F is not learned by gradient descent (it is a buffer) but
solved in closed form (alternating optimisation). For the M transitions seen
in an epoch, stack the inputs of the F-dependent term into ``X`` (M x K) and
the targets into ``Y`` (M x K): with "kl", ``X`` holds the sampled previous
states ``h~_{t-1}`` and ``Y`` the posterior means ``m_t``; with "mse", ``X``
holds ``m_{t-1}`` and ``Y`` ``m_t``. In both cases the F-dependent part of
the loss is ``||Y - X F^T||^2 / (2 sigma_h^2)`` (for "kl" the KL of two
Gaussians with the same variance contributes the squared difference of their
means; its other terms do not involve F). The averaged temporal loss plus a
ridge penalty,

    J(F) = 1 / (2 M sigma_h^2) ||Y - X F^T||^2 + alpha ||F||^2,

has the gradient ``(F X^T X - Y^T X) / (M sigma_h^2) + 2 alpha F``, which
vanishes at the unique minimiser

    (X^T X + c I) F^T = X^T Y,    c = 2 M sigma_h^2 alpha.

Because ``X`` holds draws ``h~ = m + s * eps``, ``E[X^T X] = sum m m^T +
sum diag(s^2)``: the posterior variance of the previous state enters the
normal equations through the samples (on average), as it does in the
expected temporal KL. The statistics ``X^T X``, ``X^T Y`` and M are those of
the very loss the gradient steps minimise, so F is the exact minimiser of
that loss given the trajectories (:func:`solve_transition`).
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from neurovae.nn.latent import LOGVAR_MAX, LOGVAR_MIN, GaussianLatent
from neurovae.nn.noise import standard_normal

_SUBJECT_EFFECTS = ("amortized", "table", None)
_TEMPORAL_LOSSES = ("kl", "mse")
_NOISE_CHUNK = 64  # eval noise is drawn in chunks: a prefix never changes


def solve_transition(
    xtx: torch.Tensor,
    xty: torch.Tensor,
    n_transitions: int | float,
    sigma: float,
    alpha: float,
) -> torch.Tensor:
    """Closed-form ridge transition: the F minimising the averaged loss.

    Solves ``(X^T X + c I) F^T = X^T Y`` with ``c = 2 M sigma^2 alpha``, the
    minimiser of ``||Y - X F^T||^2 / (2 M sigma^2) + alpha ||F||^2`` over the
    ``M = n_transitions`` stacked transitions (rows of ``X`` and ``Y``).

    Parameters
    ----------
    xtx : torch.Tensor of shape (K, K)
        ``X^T X``, the Gram matrix of the previous states.
    xty : torch.Tensor of shape (K, K)
        ``X^T Y``, previous states against the next ones.
    n_transitions : int or float
        Number of stacked transitions M.
    sigma : float
        Standard deviation of the transition noise.
    alpha : float
        Ridge penalty on ``||F||^2`` (Frobenius).

    Returns
    -------
    torch.Tensor of shape (K, K)
        The transition F (float64): next state ``h_t = h_{t-1} F^T``.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn.recurrent import solve_transition
    >>> X = torch.randn(500, 2, dtype=torch.float64)
    >>> F_true = torch.tensor([[0.9, 0.0], [0.2, 0.5]], dtype=torch.float64)
    >>> Y = X @ F_true.T
    >>> F_hat = solve_transition(X.T @ X, X.T @ Y, 500, sigma=1.0, alpha=0.0)
    >>> torch.allclose(F_hat, F_true)
    True
    """
    xtx = xtx.double()
    xty = xty.double()
    k = xtx.shape[0]
    c = 2.0 * float(n_transitions) * float(sigma) ** 2 * float(alpha)
    eye = torch.eye(k, dtype=torch.float64, device=xtx.device)
    system = xtx + c * eye
    try:
        transposed = torch.linalg.solve(system, xty)
    except RuntimeError:  # singular without a ridge: least squares instead
        transposed = torch.linalg.lstsq(system, xty).solution
    return transposed.T.contiguous()


def spectral_radius(transition: torch.Tensor) -> float:
    """Largest modulus of the eigenvalues of a square matrix.

    Parameters
    ----------
    transition : torch.Tensor of shape (K, K)

    Returns
    -------
    float

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn.recurrent import spectral_radius
    >>> round(spectral_radius(torch.tensor([[0.0, -0.5], [0.5, 0.0]])), 6)
    0.5
    """
    eig = torch.linalg.eigvals(transition.detach().double().cpu())
    return float(eig.abs().max()) if eig.numel() else 0.0


def kl_gaussians(
    mu: torch.Tensor, logvar: torch.Tensor, prior_mu: torch.Tensor, prior_var: float
) -> torch.Tensor:
    """KL(N(mu, diag exp(logvar)) || N(prior_mu, prior_var I)), summed over the
    last axis.

    Parameters
    ----------
    mu, logvar : torch.Tensor of shape (..., K)
        Posterior means and log-variances.
    prior_mu : torch.Tensor of shape (..., K)
        Prior means.
    prior_var : float
        Prior variance (isotropic).

    Returns
    -------
    torch.Tensor of shape (...)

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn.recurrent import kl_gaussians
    >>> kl_gaussians(torch.ones(1, 2), torch.zeros(1, 2), torch.zeros(1, 2), 1.0)
    tensor([1.])
    """
    log_prior = math.log(prior_var)
    return 0.5 * (
        (logvar.exp() + (mu - prior_mu).pow(2)) / prior_var - 1.0 - logvar + log_prior
    ).sum(dim=-1)


class RecurrentVAEModule(nn.Module):
    """A recurrent VAE over runs, with a linear transition solved in closed form.

    See the module docstring of :mod:`neurovae.nn.recurrent` for the model
    and the derivation of the closed-form transition. The training engine
    calls :meth:`loss` with a batch ``(x, lengths, subjects)``: ``x`` of
    shape ``(n, T, *frame_shape)`` padded after each run's end, ``lengths``
    the number of valid frames of each run and ``subjects`` the row of the
    subject table of each run (used with ``subject_effects="table"``).

    Parameters
    ----------
    encoder : nn.Module
        Frame encoder: ``(n, *frame_shape)`` to features of any shape.
    decoder : nn.Module
        Frame decoder: ``(n, n_components)`` to the raw output
        ``(n, *frame_shape)``.
    n_features : int
        Size of the flattened encoder output.
    n_components : int
        Dimension K of the latent state.
    likelihood : nn.Module
        Observation model of a frame (``log_prob(x, out)`` and ``mean(out)``).
    subject_effects : {"amortized", "table", None}, default="amortized"
        How the per-run offset ``z_s`` is obtained.
    n_subjects : int, default=0
        Rows of the subject table (``subject_effects="table"``).
    temporal_loss : {"kl", "mse"}, default="kl"
        The temporal term (see the module docstring).
    sigma_h : float, default=0.5
        Standard deviation of the transition noise.
    ridge_alpha : float, default=0.1
        Ridge penalty of the closed-form transition.
    subject_l1 : float, default=1.0
        Weight of the L1 penalty on the table rows.
    n_hidden : int, default=64
        Width of the hidden layer of the recurrent posterior.

    Attributes
    ----------
    transition : torch.Tensor of shape (K, K)
        The transition F (a buffer, zero at initialisation: a stable start).
    step_statistics : dict of str to torch.Tensor or None
        ``X^T X``, ``X^T Y`` and the number of transitions of the last
        training step (detached), for :meth:`closed_form_update`.
    generator : torch.Generator or None
        Source of the reparameterisation noise in training mode.

    Examples
    --------
    >>> import torch
    >>> from neurovae.nn import make_backbone, make_likelihood
    >>> from neurovae.nn.recurrent import RecurrentVAEModule
    >>> encoder, decoder = make_backbone("mlp", (6,), 3, hidden_layer_sizes=(8,))
    >>> module = RecurrentVAEModule(encoder, decoder, 8, 3,
    ...                             make_likelihood("gaussian", (6,)))
    >>> x, lengths = torch.randn(4, 5, 6), torch.tensor([5, 5, 3, 2])
    >>> sorted(module.loss((x, lengths, torch.arange(4))))
    ['kl', 'loss', 'recon', 'subject']
    >>> module.step_statistics["count"]  # transitions: 4 + 4 + 2 + 1
    tensor(11.)
    >>> mu, logvar = module.encode_states(module.encode_frames(x))
    >>> mu.shape
    torch.Size([4, 5, 3])
    """

    def __init__(
        self,
        encoder: nn.Module,
        decoder: nn.Module,
        n_features: int,
        n_components: int,
        likelihood: nn.Module,
        *,
        subject_effects: str | None = "amortized",
        n_subjects: int = 0,
        temporal_loss: str = "kl",
        sigma_h: float = 0.5,
        ridge_alpha: float = 0.1,
        subject_l1: float = 1.0,
        n_hidden: int = 64,
    ) -> None:
        super().__init__()
        if subject_effects not in _SUBJECT_EFFECTS:
            raise ValueError(f"unknown subject_effects {subject_effects!r}")
        if temporal_loss not in _TEMPORAL_LOSSES:
            raise ValueError(f"unknown temporal_loss {temporal_loss!r}")
        self.encoder = encoder
        self.decoder = decoder
        self.likelihood = likelihood
        self.n_components = int(n_components)
        self.subject_effects = subject_effects
        self.temporal_loss = temporal_loss
        self.sigma_h = float(sigma_h)
        self.ridge_alpha = float(ridge_alpha)
        self.subject_l1 = float(subject_l1)
        k = self.n_components
        self.frame_in = nn.Linear(n_features, n_hidden)
        self.state_in = nn.Linear(k, n_hidden, bias=False)
        self.posterior_out = nn.Linear(n_hidden, 2 * k)
        self.subject_latent = None
        self.subject_table = None
        if subject_effects == "amortized":
            self.subject_latent = GaussianLatent(n_features, k)
        elif subject_effects == "table":
            self.subject_table = nn.Parameter(torch.zeros(int(n_subjects), k))
        self.register_buffer("transition", torch.zeros(k, k))
        seed = torch.randint(0, 2**62, (), dtype=torch.int64)
        self.register_buffer("eval_seed", seed)
        self.generator: torch.Generator | None = None
        self.step_statistics: dict[str, torch.Tensor] | None = None

    # ------------------------------------------------------------------
    # encoding
    # ------------------------------------------------------------------
    def encode_frames(self, x: torch.Tensor) -> torch.Tensor:
        """Features of every frame: ``(n, T, *frame)`` to ``(n, T, n_features)``,
        the frames of all runs going through the encoder as one batch."""
        n, t = x.shape[:2]
        return self.encoder(x.flatten(0, 1)).reshape(n, t, -1)

    def _posterior(self, frame_term: torch.Tensor, h_prev: torch.Tensor):
        out = self.posterior_out(F.silu(frame_term + self.state_in(h_prev)))
        mu, logvar = out.chunk(2, dim=-1)
        return mu, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX)

    def encode_states(
        self, features: torch.Tensor, noise: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, ...]:
        """The posterior trajectory of every run.

        Parameters
        ----------
        features : torch.Tensor of shape (n, T, n_features)
            Frame features (:meth:`encode_frames`).
        noise : torch.Tensor of shape (n, T, K), optional
            Standard-normal noise: each step's draw ``h~_t = m_t + s_t *
            noise_t`` is fed to the next step. None feeds the posterior means
            (the deterministic filter used by ``transform``).

        Returns
        -------
        mu, logvar : torch.Tensor of shape (n, T, K)
            Posterior means and log-variances.
        h : torch.Tensor of shape (n, T, K)
            Only when ``noise`` is given: the draws.
        """
        frame_terms = self.frame_in(features)
        n, t_max = features.shape[:2]
        h_prev = frame_terms.new_zeros(n, self.n_components)
        mus, logvars, draws = [], [], []
        for t in range(t_max):
            mu, logvar = self._posterior(frame_terms[:, t], h_prev)
            if noise is None:
                h_prev = mu
            else:
                h_prev = mu + torch.exp(0.5 * logvar) * noise[:, t]
                draws.append(h_prev)
            mus.append(mu)
            logvars.append(logvar)
        mu, logvar = torch.stack(mus, dim=1), torch.stack(logvars, dim=1)
        if noise is None:
            return mu, logvar
        return mu, logvar, torch.stack(draws, dim=1)

    @staticmethod
    def valid_mask(lengths: torch.Tensor, t_max: int) -> torch.Tensor:
        """Bool ``(n, T)``: which frames are inside their run."""
        steps = torch.arange(t_max, device=lengths.device)
        return steps[None, :] < lengths[:, None]

    def subject_posterior(
        self, features: torch.Tensor, lengths: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and log-variance of the amortised q(z_s | run), from the
        average frame features of the run's valid frames."""
        valid = self.valid_mask(lengths, features.shape[1]).to(features.dtype)
        pooled = (features * valid[..., None]).sum(1) / valid.sum(1, keepdim=True)
        return self.subject_latent(pooled)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        """Mean of p(x | code) for codes ``(..., K)`` (``h_t + z_s``)."""
        lead = codes.shape[:-1]
        out = self.likelihood.mean(self.decoder(codes.reshape(-1, codes.shape[-1])))
        return out.reshape(*lead, *out.shape[1:])

    # ------------------------------------------------------------------
    # the objective
    # ------------------------------------------------------------------
    def _noise(self, n: int, t_max: int, like: torch.Tensor):
        """Standard-normal noise ``(n, 1 + T, K)`` (the first row for z_s): drawn
        from :attr:`generator` in training mode; in eval mode the same fixed
        draw for every run, from :attr:`eval_seed`, in chunks so that a run's
        noise does not depend on the length of the others."""
        k = self.n_components
        if self.training:
            # under DDP: the global batch's noise, this rank's rows (equal
            # to one process's draws when the runs have one length)
            return standard_normal(
                (n, 1 + t_max, k),
                self.generator,
                device=like.device,
                dtype=like.dtype,
            )
        generator = torch.Generator().manual_seed(int(self.eval_seed))
        rows = 1 + t_max
        chunks = [
            torch.randn(_NOISE_CHUNK, k, generator=generator)
            for _ in range(-(-rows // _NOISE_CHUNK))
        ]
        noise = torch.cat(chunks)[:rows].to(device=like.device, dtype=like.dtype)
        return noise.expand(n, rows, k)

    def terms(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        subjects: torch.Tensor | None = None,
        offsets: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """Per-run terms of the negative ELBO (one draw of the noise).

        ``offsets`` (n, K), when given, replace the subject offsets (e.g.
        those fitted for new runs of a "table" model); their term is then 0.
        Returns per-run ``recon``, ``kl`` (temporal), ``subject`` and the
        statistics of the transitions (``xtx``, ``xty``, ``count``).
        """
        n, t_max = x.shape[:2]
        lengths = lengths.to(x.device)
        valid = self.valid_mask(lengths, t_max)
        features = self.encode_frames(x)
        noise = self._noise(n, t_max, features)
        mu, logvar, h = self.encode_states(features, noise[:, 1:])
        mu32, logvar32 = mu.float(), logvar.float()

        subject_term = mu32.new_zeros(n)
        if offsets is not None:
            z = offsets.to(mu.dtype)
        elif self.subject_effects == "amortized":
            z_mu, z_logvar = self.subject_posterior(features, lengths)
            z = z_mu + torch.exp(0.5 * z_logvar) * noise[:, 0]
            zeros = z_mu.new_zeros(z_mu.shape).float()
            subject_term = kl_gaussians(z_mu.float(), z_logvar.float(), zeros, 1.0)
        elif self.subject_effects == "table":
            z = self.subject_table[subjects.to(x.device)]
            subject_term = self.subject_l1 * z.float().abs().sum(dim=1)
        else:
            z = mu.new_zeros(n, self.n_components)

        out = self.decoder((h + z[:, None]).flatten(0, 1))
        nll = -self.likelihood.log_prob(x.flatten(0, 1), out).reshape(n, t_max)
        recon = (nll * valid).sum(dim=1)

        var_h = self.sigma_h**2
        # transitions t-1 -> t inside the run
        pairs = valid[:, 1:]
        if self.temporal_loss == "kl":
            kl = kl_gaussians(mu32[:, :1], logvar32[:, :1], 0.0 * mu32[:, :1], 1.0)
            inputs = h[:, :-1].float()
            prior_mu = inputs @ self.transition.T.to(inputs.dtype)
            kl_t = kl_gaussians(mu32[:, 1:], logvar32[:, 1:], prior_mu, var_h)
            temporal = kl[:, 0] + (kl_t * pairs).sum(dim=1)
        else:
            kl = kl_gaussians(mu32, logvar32, torch.zeros_like(mu32), 1.0)
            inputs = mu32[:, :-1]
            prior_mu = inputs @ self.transition.T.to(inputs.dtype)
            sq = (mu32[:, 1:] - prior_mu).pow(2).sum(dim=-1) / (2.0 * var_h)
            temporal = (kl * valid).sum(dim=1) + (sq * pairs).sum(dim=1)
        x_prev = inputs.detach()[pairs]
        y_next = mu32.detach()[:, 1:][pairs]
        return {
            "recon": recon,
            "kl": temporal,
            "subject": subject_term,
            "xtx": x_prev.T @ x_prev,
            "xty": x_prev.T @ y_next,
            "count": pairs.sum().to(torch.float32),
        }

    def loss(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        """Training objective (negative ELBO per run, averaged over the batch)
        and its terms; in training mode the step's transition statistics are
        kept in :attr:`step_statistics`."""
        x, lengths = batch[0], batch[1]
        subjects = batch[2] if len(batch) > 2 else None
        terms = self.terms(x, lengths, subjects)
        if self.training:
            self.step_statistics = {
                key: terms[key].detach() for key in ("xtx", "xty", "count")
            }
        recon, kl, subject = (terms[k].mean() for k in ("recon", "kl", "subject"))
        return {
            "loss": recon + kl + subject,
            "recon": recon,
            "kl": kl,
            "subject": subject,
        }

    def forward(self, batch: tuple[torch.Tensor, ...]) -> dict[str, torch.Tensor]:
        return self.loss(batch)

    def elbo(
        self,
        x: torch.Tensor,
        lengths: torch.Tensor,
        offsets: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Per-run evidence lower bound (one draw of the noise, see
        :meth:`terms`; deterministic in eval mode)."""
        terms = self.terms(x, lengths, offsets=offsets)
        return -(terms["recon"] + terms["kl"] + terms["subject"])

    # ------------------------------------------------------------------
    # the closed-form step
    # ------------------------------------------------------------------
    @torch.no_grad()
    def closed_form_update(self, sums: dict[str, torch.Tensor]) -> dict[str, float]:
        """Solve the transition from an epoch's summed statistics.

        Called by :class:`~neurovae.training.ClosedFormHook` after each epoch
        with the sums of :attr:`step_statistics`; sets :attr:`transition` to
        the exact minimiser (:func:`solve_transition`) and returns its
        spectral radius for the history.
        """
        count = float(sums.get("count", 0.0))
        if count > 0:
            transition = solve_transition(
                sums["xtx"], sums["xty"], count, self.sigma_h, self.ridge_alpha
            )
            self.transition.copy_(transition.to(self.transition))
        return {"spectral_radius": spectral_radius(self.transition)}

    def rollout(self, h: torch.Tensor, n_steps: int) -> torch.Tensor:
        """Mean states ``h F^T, h (F^T)^2, ...``: ``(n, K)`` to ``(n, n_steps, K)``."""
        transition = self.transition.T.to(h.dtype)
        states = []
        for _ in range(n_steps):
            h = h @ transition
            states.append(h)
        return torch.stack(states, dim=1)
