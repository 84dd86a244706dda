"""Tests of the torch modules: backbones, latent head, likelihoods, VAEModule."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import distributions as D
from torch import nn

from neurovae.nn import (
    BernoulliLikelihood,
    GaussianLatent,
    GaussianLikelihood,
    LaplaceLikelihood,
    VAEModule,
    infer_output_size,
    kl_standard_normal,
    make_backbone,
    make_likelihood,
)
from neurovae.nn.backbones import ResBlock3d, ResNetEncoder3d, level_shapes

SMALL = dict(hidden_layer_sizes=(8,), channels=(2, 4))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# ---------------------------------------------------------------------------
# backbones
# ---------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["mlp", "conv", "resnet"])
@pytest.mark.parametrize(
    "sample_shape, coarsest", [((1, 9, 11, 7), (3, 3, 2)), ((2, 13, 10, 5), (4, 3, 2))]
)
def test_backbone_shapes_on_odd_grids(kind, sample_shape, coarsest):
    n_components = 3
    encoder, decoder = make_backbone(kind, sample_shape, n_components, **SMALL)
    x = torch.randn(2, *sample_shape)
    h = encoder(x)
    if kind == "mlp":
        assert h.shape == (2, 8)
    else:  # two stride-2 levels: each side s -> ceil(ceil(s / 2) / 2)
        assert h.shape == (2, 4, *coarsest)
    assert infer_output_size(encoder, sample_shape) == h[0].numel()
    out = decoder(torch.randn(2, n_components))
    assert out.shape == (2, *sample_shape)


def test_mlp_backbone_on_flat_features():
    encoder, decoder = make_backbone("mlp", (20,), 4, hidden_layer_sizes=(16, 8))
    assert encoder(torch.randn(5, 20)).shape == (5, 8)
    assert decoder(torch.randn(5, 4)).shape == (5, 20)


def test_conv_backbone_on_mni_grid():
    """The 2 mm MNI grid 91 x 109 x 91 (odd sides) round-trips exactly."""
    sample_shape = (1, 91, 109, 91)
    encoder, decoder = make_backbone("conv", sample_shape, 2, channels=(2, 4))
    with torch.no_grad():
        h = encoder(torch.zeros(1, *sample_shape))
        out = decoder(torch.zeros(1, 2))
    assert h.shape == (1, 4, 23, 28, 23)
    assert out.shape == (1, *sample_shape)


def test_level_shapes():
    assert level_shapes((91, 109, 91), 3) == [
        (91, 109, 91),
        (46, 55, 46),
        (23, 28, 23),
        (12, 14, 12),
    ]


def test_make_backbone_errors():
    with pytest.raises(ValueError, match="unknown backbone 'unet'"):
        make_backbone("unet", (1, 4, 4, 4), 2)
    for kind in ("conv", "resnet"):
        with pytest.raises(ValueError, match=r"\(channels, x, y, z\)"):
            make_backbone(kind, (20,), 2)


def test_infer_output_size_runs_in_eval_mode():
    # BatchNorm in training mode rejects a batch of one sample
    encoder = nn.Sequential(nn.Linear(6, 5), nn.BatchNorm1d(5), nn.Linear(5, 3))
    encoder.train()
    assert infer_output_size(encoder, (6,)) == 3
    assert encoder.training  # the mode is restored
    assert infer_output_size(nn.Flatten(), (2, 3, 4)) == 24  # no parameters


def test_infer_output_size_needs_a_tensor():
    class TupleOut(nn.Module):
        def forward(self, x):
            return x, x

    with pytest.raises(TypeError, match="must return a tensor, got tuple"):
        infer_output_size(TupleOut(), (3,))


def test_resnet_blocks_start_as_identity():
    block = ResBlock3d(4)
    x = torch.randn(2, 4, 5, 6, 3)
    assert torch.equal(block(x), x)
    encoder = ResNetEncoder3d(1, (2, 4), n_res_blocks=2)
    blocks = [m for m in encoder.modules() if isinstance(m, ResBlock3d)]
    assert len(blocks) == 4
    for block in blocks:
        x = torch.randn(1, block.net[0].num_channels, 3, 3, 3)
        assert torch.equal(block(x), x)


# ---------------------------------------------------------------------------
# likelihoods
# ---------------------------------------------------------------------------
def _random_scale(likelihood):
    with torch.no_grad():
        likelihood.raw_scale.copy_(torch.randn_like(likelihood.raw_scale))
    return likelihood.scale


@pytest.mark.parametrize(
    "cls, dist",
    [(GaussianLikelihood, D.Normal), (LaplaceLikelihood, D.Laplace)],
)
@pytest.mark.parametrize("scale", ["global", "feature"])
@pytest.mark.parametrize("event_shape", [(7,), (1, 3, 4, 2)])
def test_location_scale_log_prob(cls, dist, scale, event_shape):
    likelihood = cls(event_shape, scale=scale, init_scale=0.7)
    assert likelihood.scale.shape == (() if scale == "global" else event_shape)
    assert torch.allclose(likelihood.scale, torch.tensor(0.7))
    x, out = torch.randn(5, *event_shape), torch.randn(5, *event_shape)
    for randomise in (False, True):
        sigma = _random_scale(likelihood) if randomise else likelihood.scale
        expected = dist(out, sigma).log_prob(x).flatten(1).sum(1)
        log_prob = likelihood.log_prob(x, out)
        assert log_prob.shape == (5,)
        torch.testing.assert_close(log_prob, expected)
    assert torch.equal(likelihood.mean(out), out)


@pytest.mark.parametrize("name", ["gaussian", "laplace"])
@pytest.mark.parametrize("scale", ["global", "feature"])
def test_scale_never_below_min_scale(name, scale):
    likelihood = make_likelihood(name, (4,), scale=scale, min_scale=0.05)
    with torch.no_grad():
        likelihood.raw_scale.fill_(-1e4)
    assert torch.all(likelihood.scale >= 0.05)
    # a tiny init_scale is lifted to the bound, not below it
    tiny = make_likelihood(name, (4,), scale=scale, init_scale=1e-9, min_scale=0.05)
    assert torch.all(tiny.scale >= 0.05)
    # the bound holds while training drives the scale down
    x = torch.zeros(3, 4)
    optimizer = torch.optim.SGD(likelihood.parameters(), lr=10.0)
    for _ in range(20):
        optimizer.zero_grad()
        (-likelihood.log_prob(x, x).sum()).backward()
        optimizer.step()
    assert torch.all(likelihood.scale >= 0.05)
    assert torch.all(torch.isfinite(likelihood.log_prob(x, x)))


def test_likelihood_errors():
    with pytest.raises(ValueError, match="scale must be 'global' or 'feature'"):
        GaussianLikelihood((3,), scale="voxel")
    with pytest.raises(ValueError, match="min_scale must be > 0"):
        LaplaceLikelihood((3,), min_scale=0.0)
    with pytest.raises(ValueError, match="unknown likelihood 'poisson'"):
        make_likelihood("poisson", (3,))


def test_bernoulli():
    likelihood = make_likelihood("bernoulli", (2, 3))
    assert isinstance(likelihood, BernoulliLikelihood)
    out = torch.randn(4, 2, 3)
    x = torch.rand(4, 2, 3)  # probabilities: the continuous relaxation
    bce = F.binary_cross_entropy_with_logits(out, x, reduction="none")
    torch.testing.assert_close(likelihood.log_prob(x, out), -bce.sum((1, 2)))
    binary = torch.bernoulli(x)
    expected = D.Bernoulli(logits=out).log_prob(binary).sum((1, 2))
    torch.testing.assert_close(likelihood.log_prob(binary, out), expected)
    torch.testing.assert_close(likelihood.mean(out), torch.sigmoid(out))


# ---------------------------------------------------------------------------
# latent head
# ---------------------------------------------------------------------------
def test_kl_standard_normal():
    mu, logvar = torch.randn(6, 3), torch.randn(6, 3)
    posterior = D.Normal(mu, torch.exp(0.5 * logvar))
    prior = D.Normal(torch.zeros(3), torch.ones(3))
    expected = D.kl_divergence(posterior, prior).sum(1)
    torch.testing.assert_close(kl_standard_normal(mu, logvar), expected)
    zeros = torch.zeros(2, 3)  # the prior itself: no divergence
    assert torch.equal(kl_standard_normal(zeros, zeros), torch.zeros(2))


def test_gaussian_latent_flattens_and_bounds_logvar():
    head = GaussianLatent(in_features=12, n_components=3)
    mu, logvar = head(torch.randn(5, 3, 2, 2))
    assert mu.shape == logvar.shape == (5, 3)
    with torch.no_grad():
        head.linear.bias.fill_(1e4)
    _, logvar = head(torch.zeros(1, 12))
    assert torch.isfinite(logvar.exp()).all()


# ---------------------------------------------------------------------------
# VAEModule
# ---------------------------------------------------------------------------
def small_vae(n_features=6, n_components=2):
    encoder, decoder = make_backbone(
        "mlp", (n_features,), n_components, hidden_layer_sizes=(8,)
    )
    return VAEModule(
        encoder,
        decoder,
        GaussianLatent(infer_output_size(encoder, (n_features,)), n_components),
        make_likelihood("gaussian", (n_features,)),
    )


def test_vae_loss_terms():
    module = small_vae()
    module.beta = 3.0
    out = module.loss((torch.randn(4, 6),))
    assert set(out) == {"loss", "recon", "kl"}
    assert all(v.shape == () for v in out.values())
    torch.testing.assert_close(out["loss"], out["recon"] + 3.0 * out["kl"])
    assert out["kl"] > 0
    out["loss"].backward()  # the objective reaches every parameter
    assert all(p.grad is not None for p in module.parameters())


def test_vae_loss_under_capacity():
    module = small_vae()
    module.beta, module.capacity, module.gamma = 1e6, 5.0, 7.0  # beta is unused
    out = module((torch.randn(4, 6),))  # forward is loss
    expected = out["recon"] + 7.0 * (out["kl"] - 5.0).abs()
    torch.testing.assert_close(out["loss"], expected)
    module.capacity = 0.0  # |KL - 0| = KL
    out = module.loss((torch.randn(4, 6),))
    torch.testing.assert_close(out["loss"], out["recon"] + 7.0 * out["kl"])


def test_vae_elbo_with_fixed_noise():
    module = small_vae().eval()
    x = torch.randn(5, 6)
    eps = torch.randn(5, 2)
    with torch.no_grad():
        first = module.elbo(x, eps)
        torch.randn(10)  # the global generator plays no part
        second = module.elbo(x, eps)
        other = module.elbo(x, eps + 1.0)
        nll, kl = module.terms(x, eps)
    assert first.shape == (5,)
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    torch.testing.assert_close(first, -(nll + kl))
    # with zero noise the ELBO is that of the posterior mean
    with torch.no_grad():
        mu, logvar = module.encode(x)
        nll_mean = -module.likelihood.log_prob(x, module.decoder(mu))
        zero = module.elbo(x, torch.zeros(5, 2))
    torch.testing.assert_close(zero, -(nll_mean + kl_standard_normal(mu, logvar)))
    assert math.isfinite(zero.sum().item())


def test_vae_decode_is_likelihood_mean():
    encoder, decoder = make_backbone("mlp", (6,), 2, hidden_layer_sizes=(8,))
    module = VAEModule(encoder, decoder, GaussianLatent(8, 2), BernoulliLikelihood())
    z = torch.randn(3, 2)
    torch.testing.assert_close(module.decode(z), torch.sigmoid(decoder(z)))
    assert module.n_components == 2


# ---------------------------------------------------------------------------
# contrastive VAE module and its discriminator
# ---------------------------------------------------------------------------
def _pair_loss_after_training(s, z, steps=300):
    from neurovae.nn import PairDiscriminator

    disc = PairDiscriminator(s.shape[1], z.shape[1])
    opt = torch.optim.Adam(disc.parameters(), lr=1e-2)
    generator = torch.Generator().manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        loss = disc.loss(s, z, generator)
        loss.backward()
        opt.step()
    with torch.no_grad():
        return disc.loss(s, z, generator).item()


def test_pair_discriminator_detects_dependence_only():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(256, 2, generator=g)
    dependent = _pair_loss_after_training(
        z[:, :1] + 0.1 * torch.randn(256, 1, generator=g), z
    )
    independent = _pair_loss_after_training(
        torch.randn(256, 1, generator=g), z, steps=50
    )
    assert dependent < 0.5 < 1.2 < independent  # log(4) = 1.39 when at chance


def _contrastive(n_features=6, n_shared=2, n_salient=1, disc=True):
    from neurovae.nn import ContrastiveVAEModule, PairDiscriminator

    enc_z, dec = make_backbone("mlp", (n_features,), n_shared + n_salient, **SMALL)
    enc_s, _ = make_backbone("mlp", (n_features,), n_shared + n_salient, **SMALL)
    return ContrastiveVAEModule(
        enc_z,
        enc_s,
        dec,
        GaussianLatent(8, n_shared),
        GaussianLatent(8, n_salient),
        make_likelihood("gaussian", (n_features,)),
        PairDiscriminator(n_salient, n_shared) if disc else None,
    )


@torch.no_grad()
def test_background_samples_are_decoded_without_salient_code():
    module = _contrastive().eval()
    x = torch.randn(4, 6)
    background = torch.zeros(4, dtype=torch.bool)
    nll, kl, code = module.terms(x, background)
    assert (code[:, 2:] == 0).all() and (code[:, :2] != 0).all()
    mu, logvar = module.encode(x)
    np.testing.assert_allclose(kl, kl_standard_normal(mu[:, :2], logvar[:, :2]))
    # a target sample's KL adds its salient posterior's
    _, kl_t, code_t = module.terms(x, ~background)
    np.testing.assert_allclose(kl_t, kl_standard_normal(mu, logvar), rtol=1e-6)
    assert (code_t[:, 2:] != 0).all()
    groups = module.elbo_groups(x)
    np.testing.assert_allclose(groups[:, 0], -(nll + kl), rtol=1e-6)


def test_contrastive_loss_terms_and_detached_codes():
    module = _contrastive().train()
    x, target = torch.randn(8, 6), torch.tensor([True] * 4 + [False] * 4)
    out = module.loss((x, target))
    assert set(out) == {"loss", "recon", "kl", "tc"}
    module.gamma, module.beta = 2.0, 0.5
    out = module.loss((x, target))
    # the objective and its terms agree (the noise differs between calls)
    assert torch.allclose(out["loss"], out["recon"] + 0.5 * out["kl"] + 2.0 * out["tc"])
    s, z = module.last_codes
    assert s.shape == (4, 1) and z.shape == (4, 2) and not s.requires_grad
    module.zero_grad(set_to_none=True)
    module.discriminator_loss().backward()
    trained = {n for n, p in module.named_parameters() if p.grad is not None}
    assert trained and all(n.startswith("discriminator.") for n in trained)
    assert module.discriminator_loss() is None  # the codes are used once
    # one target sample: its pair's logit is the estimate (a batch's tc is
    # then the same however it is split among processes), but there are no
    # pairs to permute, so the discriminator does not train on it
    module = _contrastive().train()
    out = module.loss((x, torch.tensor([True] + [False] * 7)))
    s, z = module.last_codes
    assert torch.equal(out["tc"], module.discriminator(s, z).mean())
    assert module.discriminator_loss() is None
    # no target sample: no term
    out = _contrastive().train().loss((x, torch.zeros(8, dtype=torch.bool)))
    assert out["tc"] == 0
