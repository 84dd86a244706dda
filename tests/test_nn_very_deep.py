"""Tests of the very deep hierarchical VAE module (neurovae.nn.very_deep)."""

import pytest
import torch

from neurovae.nn import (
    BottleneckBlock3d,
    TopDownBlock3d,
    VeryDeepVAEModule,
    kl_diagonal_gaussians,
    make_likelihood,
)

SHAPE = (16, 16, 8)


def make_vae(shape=SHAPE, **kwargs):
    params = dict(
        channels=(8, 8, 8),
        channels_hidden=(4, 4, 4),
        channels_per_latent=(1, 2, 2),
        latents_per_resolution=(1, 1, 2),
        kernel_sizes=(1, 3, 3),
        n_blocks_per_resolution=1,
    )
    params.update(kwargs)
    likelihood = params.pop("likelihood", None) or make_likelihood(
        "gaussian", (1, *shape), scale="feature"
    )
    torch.manual_seed(0)
    return VeryDeepVAEModule(1, shape, likelihood=likelihood, **params)


def batch(n=3, shape=SHAPE, seed=1):
    return torch.randn(n, 1, *shape, generator=torch.Generator().manual_seed(seed))


def test_bookkeeping_and_shapes():
    vae = make_vae()
    assert vae.n_latent_groups == 4
    assert vae.level_of_group == [2, 2, 1, 0]  # coarsest first
    assert vae.latent_shapes == [(2, 4, 4, 2), (2, 4, 4, 2), (2, 8, 8, 4), (1, *SHAPE)]
    x = batch()
    zs = vae.encode(x)
    assert [tuple(z.shape[1:]) for z in zs] == vae.latent_shapes
    assert all(len(z) == 3 for z in zs)
    assert vae.decode_latents(zs).shape == x.shape
    assert vae.sample(2).shape == (2, 1, *SHAPE)
    acts = vae.bottom_up(x)
    assert [tuple(a.shape[2:]) for a in acts] == [SHAPE, (8, 8, 4), (4, 4, 2)]


def test_loss_terms():
    vae = make_vae()
    vae.generator = torch.Generator().manual_seed(0)
    terms = vae.loss((batch(),))
    assert sorted(terms) == [
        "kl",
        "kl_level0",
        "kl_level1",
        "kl_level2",
        "loss",
        "recon",
    ]
    assert all(t.shape == () for t in terms.values())
    levels = terms["kl_level0"] + terms["kl_level1"] + terms["kl_level2"]
    torch.testing.assert_close(levels, terms["kl"])
    torch.testing.assert_close(terms["loss"], terms["recon"] + terms["kl"])
    assert vae((batch(),))["loss"].requires_grad  # forward is loss
    vae.beta = 0.0
    vae.generator = torch.Generator().manual_seed(0)
    terms0 = vae.loss((batch(),))
    torch.testing.assert_close(terms0["loss"], terms0["recon"])


def test_kl_nonnegative_and_matches_distributions():
    vae = make_vae()
    groups = vae.latent_distributions(batch())
    for group in groups:
        assert (group["kl"] >= 0).all()
    g = groups[2]
    q = torch.distributions.Normal(g["q_mean"], g["q_logstd"].exp())
    p = torch.distributions.Normal(g["p_mean"], g["p_logstd"].exp())
    expected = torch.distributions.kl_divergence(q, p).flatten(1).sum(1)
    torch.testing.assert_close(g["kl"], expected)


def test_kl_closed_form_against_monte_carlo():
    gen = torch.Generator().manual_seed(0)
    q_mean, p_mean = torch.randn(2, 1, 3, generator=gen).unbind(0)
    q_logstd, p_logstd = (0.3 * torch.randn(2, 1, 3, generator=gen)).unbind(0)
    q = torch.distributions.Normal(q_mean, q_logstd.exp())
    p = torch.distributions.Normal(p_mean, p_logstd.exp())
    z = q.sample((200_000,))
    mc = (q.log_prob(z) - p.log_prob(z)).sum(-1).mean(0)
    kl = kl_diagonal_gaussians(q_mean, q_logstd, p_mean, p_logstd)
    assert kl.shape == (1,)
    torch.testing.assert_close(kl, mc, atol=0.02, rtol=0.02)
    zero = torch.zeros(1, 3)
    assert kl_diagonal_gaussians(zero, zero, zero, zero).item() == 0.0


def test_priors_start_standard_normal():
    vae = make_vae()
    blocks = [b for level in reversed(vae.dec_groups) for b in level]
    assert blocks[0].prior is None  # the first group's prior is N(0, I)
    assert all(b.prior is not None for b in blocks[1:])
    for group in vae.latent_distributions(batch()):
        assert group["p_mean"].count_nonzero() == 0
        assert group["p_logstd"].count_nonzero() == 0


def test_first_group_below_an_empty_coarsest_resolution():
    vae = make_vae(latents_per_resolution=(1, 2, 0))
    assert vae.level_of_group == [1, 1, 0]
    assert vae.dec_groups[1][0].prior is None
    assert vae.dec_groups[1][1].prior is not None
    assert len(vae.dec_blocks[2]) == 1 and len(vae.dec_blocks[1]) == 0
    terms = vae.loss((batch(),))
    assert terms["kl_level2"].item() == 0.0
    assert vae.sample(2, temperature=0.0).shape == (2, 1, *SHAPE)


def test_eval_is_deterministic_and_batch_independent():
    vae = make_vae().eval()
    x = batch(4)
    with torch.no_grad():
        first, second = vae.elbo(x), vae.elbo(x)
        alone = vae.elbo(x[2:3])
        loss1, loss2 = vae.loss((x,))["loss"], vae.loss((x,))["loss"]
    assert first.shape == (4,)
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    torch.testing.assert_close(alone, first[2:3], rtol=1e-5, atol=1e-3)
    assert loss1.item() == loss2.item()
    encoded = vae.encode(x[2:3])
    for a, b in zip(encoded, vae.encode(x)):
        torch.testing.assert_close(a, b[2:3], rtol=1e-5, atol=1e-5)


def test_training_noise_follows_generator():
    vae = make_vae()
    x = batch()
    losses = []
    for seed in (0, 0, 1):
        vae.generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            losses.append(vae.loss((x,))["loss"].item())
    assert losses[0] == losses[1]
    assert losses[0] != losses[2]


def test_adam_steps_reduce_loss():
    vae = make_vae(shape=(8, 8, 8), channels_per_latent=(1, 1, 1))
    vae.generator = torch.Generator().manual_seed(0)
    x = batch(4, shape=(8, 8, 8))
    opt = torch.optim.Adam(vae.parameters(), lr=3e-3)
    vae.eval()
    with torch.no_grad():
        before = vae.loss((x,))["loss"].item()
    vae.train()
    for _ in range(30):
        opt.zero_grad()
        loss = vae.loss((x,))["loss"]
        loss.backward()
        opt.step()
    vae.eval()
    with torch.no_grad():
        after = vae.loss((x,))["loss"].item()
    assert after < 0.9 * before


def test_sample_temperature():
    vae = make_vae()
    a, b = vae.sample(2, temperature=0.0), vae.sample(2, temperature=0.0)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a[0], a[1])
    c = vae.sample(2, generator=torch.Generator().manual_seed(3))
    d = vae.sample(2, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(c, d, rtol=0, atol=0)
    assert not torch.allclose(c[0], c[1])
    assert not c.requires_grad


def test_decode_latents_partial_and_errors():
    vae = make_vae()
    zs = vae.encode(batch(2))
    full = vae.decode_latents(zs)
    part = vae.decode_latents(zs[:2])  # the rest are prior means
    assert part.shape == full.shape
    with pytest.raises(ValueError, match="latent 1 must have shape"):
        vae.decode_latents([zs[0], zs[2]])
    with pytest.raises(ValueError, match="5 latents for 4"):
        vae.decode_latents([*zs, zs[-1]])
    with pytest.raises(ValueError, match="expected volumes of shape"):
        vae.encode(torch.zeros(1, 1, 8, 8, 8))


def test_gradient_checkpointing_matches():
    vae = make_vae()
    x = batch(2)
    grads = []
    for flag in (False, True):
        vae.gradient_checkpointing = flag
        vae.generator = torch.Generator().manual_seed(0)
        vae.zero_grad()
        loss = vae.loss((x,))["loss"]
        loss.backward()
        grads.append((loss.detach(), vae.stem.weight.grad.clone()))
    assert all(
        m.gradient_checkpointing
        for m in vae.modules()
        if isinstance(m, BottleneckBlock3d)
    )
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1])


def test_masked_likelihood():
    mask = torch.zeros(*SHAPE)
    mask[4:12, 4:12, 2:6] = 1
    likelihood = make_likelihood("gaussian", (1, *SHAPE), scale="feature", mask=mask)
    vae = make_vae(likelihood=likelihood).eval()
    unmasked = make_vae().eval()  # same seed, same weights
    x = batch(2)
    with torch.no_grad():
        nll_masked, nll = vae.terms(x)[0], unmasked.terms(x)[0]
    assert nll_masked.shape == (2,) and nll_masked.isfinite().all()
    assert (nll_masked.abs() < nll.abs()).all()  # fewer voxels counted


def test_last_layers_scaled_by_depth():
    vae = make_vae()
    torch.manual_seed(0)
    unscaled = BottleneckBlock3d(8, 4, 8, kernel_size=1)
    torch.manual_seed(0)
    scaled = BottleneckBlock3d(8, 4, 8, kernel_size=1, last_scale=0.5)
    torch.testing.assert_close(scaled.convs[-1].weight, 0.5 * unscaled.convs[-1].weight)
    bound = unscaled.convs[-1].weight.abs().max()
    assert vae.enc_blocks[0][0].convs[-1].weight.abs().max() < bound  # 1 / sqrt(3)
    top = TopDownBlock3d(8, 4, 2)
    assert top.prior.convs[-1].weight.count_nonzero() == 0
    assert top.prior.convs[-1].bias.count_nonzero() == 0


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(channels_hidden=(4, 4)), "channels_hidden has 2 entries"),
        (dict(kernel_sizes=(3, 3)), "kernel_sizes has 2 entries"),
        (dict(latents_per_resolution=(1, 1)), "latents_per_resolution has 2"),
        (dict(channels_per_latent=(1, 1, 1, 1)), "channels_per_latent has 4"),
        (dict(latents_per_resolution=(0, 0, 0)), "at least one group"),
        (dict(kernel_sizes=(1, 0, 3)), "kernel_sizes must be >= 1"),
        (dict(channels=(8, 0, 8)), "channels must be positive"),
    ],
)
def test_constructor_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        make_vae(**kwargs)


def test_even_kernels_keep_the_grid():
    """The reference's configurations use kernel 2 near the coarsest level."""
    vae = make_vae(kernel_sizes=(2, 3, 2))
    x = torch.randn(2, 1, *vae.input_shape)
    assert vae.sample(2).shape == x.shape
    assert torch.isfinite(vae.eval().elbo(x)).all()
    block = BottleneckBlock3d(2, 2, 2, kernel_size=2)
    conv = block.convs[1]
    with torch.no_grad():
        conv.weight.zero_()
        conv.weight[0, 0, 1, 1, 1] = 1.0  # picks the next voxel along each axis
        conv.bias.zero_()
    y = torch.arange(8.0).reshape(1, 1, 2, 2, 2).expand(1, 2, 2, 2, 2)
    out = conv(y)
    assert out.shape == y.shape
    assert out[0, 0, 0, 0, 0] == y[0, 0, 1, 1, 1] and out[0, 0, 1, 1, 1] == 0


def test_any_input_shape_is_padded_and_cropped():
    vae = make_vae(shape=(9, 10, 3))  # not multiples of 2**(3 - 1) = 4
    assert vae.padded_shape == (12, 12, 4)
    assert vae.latent_shapes[-1] == (1, 12, 12, 4)  # the finest group
    x = torch.randn(2, 1, 9, 10, 3)
    out, _ = vae.top_down(2, vae.bottom_up(x))
    assert out.shape == (2, 1, 9, 10, 3)
    assert vae.sample(2).shape == (2, 1, 9, 10, 3)
    vae.eval()
    assert torch.isfinite(vae.elbo(x)).all()
    # the padding is centred; the output is cropped from the same place
    assert vae._pad == [0, 1, 1, 1, 1, 2]  # (z, y, x) as F.pad takes them
    assert vae._crop == (slice(1, 10), slice(1, 11), slice(0, 3))
    with pytest.raises(ValueError, match=r"\(x, y, z\)"):
        make_vae(shape=(16, 16))


# ---------------------------------------------------------------------------
# the global latent
# ---------------------------------------------------------------------------
def test_global_latent_bookkeeping_and_priors():
    vae = make_vae(global_latent_dim=5)
    assert vae.latent_shapes[0] == (5,) and vae.level_of_group[0] == 3
    assert vae.n_latent_groups == 5
    # the first spatial group gets a learned prior head below the global latent
    assert all(b.prior is not None for res in vae.dec_groups for b in res)
    out = vae.loss((batch(),))
    assert "kl_global" in out
    assert torch.allclose(
        out["kl"], out["kl_global"] + sum(out[f"kl_level{r}"] for r in range(3))
    )
    assert [tuple(z.shape) for z in vae.encode(batch())][0] == (3, 5)
    assert vae.sample(2).shape == (2, 1, *SHAPE)
    # the buffers fit_global_prior sets, by their state-dict names
    assert vae.fitted_after_training == (
        "global_latent.prior_mean",
        "global_latent.prior_scale_tril",
    )
    assert set(vae.fitted_after_training) <= set(vae.state_dict())
    assert make_vae().fitted_after_training == ()


def test_global_kl_matches_distributions_with_a_full_prior():
    from torch.distributions import MultivariateNormal, kl_divergence

    glob = make_vae(global_latent_dim=4).global_latent
    g = torch.Generator().manual_seed(3)
    a = torch.randn(4, 4, generator=g)
    with torch.no_grad():
        glob.prior_mean.copy_(torch.randn(4, generator=g))
        glob.prior_scale_tril.copy_(torch.linalg.cholesky(a @ a.T + torch.eye(4)))
    mean, logstd = torch.randn(6, 4, generator=g), 0.3 * torch.randn(6, 4, generator=g)
    q = MultivariateNormal(mean, scale_tril=torch.diag_embed(logstd.exp()))
    p = MultivariateNormal(glob.prior_mean, scale_tril=glob.prior_scale_tril)
    torch.testing.assert_close(glob.kl(mean, logstd), kl_divergence(q, p))


def test_fit_global_prior_is_the_aggregate_posterior_gaussian():
    vae = make_vae(global_latent_dim=3).eval()
    x = batch(n=12)
    batches = [(x[:5],), (x[5:],)]
    vae.fit_global_prior(batches)
    q_mean, q_logstd = vae.global_latent.posterior_params(vae.bottom_up(x)[-1])
    m = q_mean.detach().double()
    cov = (m - m.mean(0)).T @ (m - m.mean(0)) / len(m)
    cov += torch.diag(torch.exp(2 * q_logstd.detach().double()).mean(0))
    glob = vae.global_latent
    torch.testing.assert_close(
        glob.prior_mean.double(), m.mean(0), rtol=1e-5, atol=1e-6
    )
    fitted = glob.prior_scale_tril.double() @ glob.prior_scale_tril.double().T
    torch.testing.assert_close(fitted, cov, rtol=1e-4, atol=1e-5)
    # the prior draws follow it
    draws = glob.prior_draw(
        20000, lambda s: torch.randn(s, generator=torch.Generator().manual_seed(0)), 1.0
    )
    torch.testing.assert_close(draws.double().mean(0), m.mean(0), atol=0.05, rtol=0)
    glob.reset_prior()
    assert glob.prior_mean.count_nonzero() == 0
    assert torch.equal(glob.prior_scale_tril, torch.eye(3))
    with pytest.raises(ValueError, match="no global latent"):
        make_vae().fit_global_prior(batches)


def test_closed_spatial_groups_carry_nothing():
    vae = make_vae(global_latent_dim=4).train()
    vae.generator = torch.Generator().manual_seed(0)
    vae.spatial_open = 0.5  # below 1: closed
    groups = vae.latent_distributions(batch())
    assert groups[0]["kl"].abs().sum() > 0  # the global latent is open
    for group in groups[1:]:
        assert torch.count_nonzero(group["kl"]) == 0
        torch.testing.assert_close(group["z"], group["p_mean"])
    # evaluation always uses every group
    vae.eval()
    assert all(g["kl"].abs().sum() > 0 for g in vae.latent_distributions(batch())[1:])


def test_global_only_rows_draw_the_spatial_groups_from_their_priors():
    vae = make_vae(global_latent_dim=4).train()
    x = batch(n=64)

    def groups_with(fraction, seed=0):
        vae.generator = torch.Generator().manual_seed(seed)
        vae.global_only_fraction = fraction
        return vae.latent_distributions(x)

    groups = groups_with(0.5)
    rows = torch.stack([g["kl"] == 0 for g in groups[1:]]).all(dim=0)
    assert 0.3 < rows.float().mean() < 0.7  # about half of the samples
    assert (groups[0]["kl"] > 0).all()  # the global latent always carries x
    for group in groups[1:]:
        assert (group["kl"][~rows] > 0).all()  # the others are posterior draws
        torch.testing.assert_close(group["q_mean"][rows], group["p_mean"][rows])
        torch.testing.assert_close(group["q_logstd"][rows], group["p_logstd"][rows])
        # prior draws, not prior means (as in the closed epochs)
        assert not torch.allclose(group["z"][rows], group["p_mean"][rows])
        eps = (group["z"] - group["p_mean"]) / group["p_logstd"].exp()
        assert abs(float(eps[rows].detach().std()) - 1.0) < 0.1
    # the choice follows the training generator
    again = torch.stack([g["kl"] == 0 for g in groups_with(0.5)[1:]]).all(dim=0)
    assert torch.equal(rows, again)
    other = torch.stack([g["kl"] == 0 for g in groups_with(0.5, seed=1)[1:]]).all(0)
    assert not torch.equal(rows, other)
    # 1: every sample; 0: none, and the training noise is that of a model
    # without the option (no extra draw)
    assert all(torch.count_nonzero(g["kl"]) == 0 for g in groups_with(1.0)[1:])
    plain = groups_with(0.0)
    assert all((g["kl"] > 0).all() for g in plain)
    reference = make_vae(global_latent_dim=4).train()
    reference.generator = torch.Generator().manual_seed(0)
    for a, b in zip(plain, reference.latent_distributions(x)):
        torch.testing.assert_close(a["z"], b["z"])
    # closed epochs take precedence: prior means, as without it
    vae.spatial_open = 0.5
    for group in groups_with(1.0)[1:]:
        torch.testing.assert_close(group["z"], group["p_mean"])
    vae.spatial_open = 1.0
    # evaluation and the ELBO ignore it
    vae.eval()
    vae.global_only_fraction = 1.0
    elbo = vae.elbo(x)
    vae.global_only_fraction = 0.0
    torch.testing.assert_close(vae.elbo(x), elbo)
    # no effect without a global latent
    plain_vae = make_vae().train()
    plain_vae.generator = torch.Generator().manual_seed(0)
    plain_vae.global_only_fraction = 1.0
    assert all((g["kl"] > 0).all() for g in plain_vae.latent_distributions(x)[1:])
