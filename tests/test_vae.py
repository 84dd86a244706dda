"""Behaviour of the VAE and BetaVAE estimators that users rely on."""

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from sklearn.exceptions import NotFittedError
from torch import nn

from neurovae import VAE, BetaVAE, ContrastiveVAE, RecurrentVAE, VeryDeepVAE
from neurovae.nn import ConvEncoder3d, MLPEncoder, ResNetEncoder3d

pytestmark = pytest.mark.usefixtures("one_thread")

ESTIMATORS = [VAE, BetaVAE]


def _state(estimator):
    return {k: v.clone() for k, v in estimator.module_.state_dict().items()}


def _same_state(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ----------------------------------------------------------------------
# shapes and dtypes
# ----------------------------------------------------------------------
@pytest.mark.parametrize("Estimator", ESTIMATORS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_shapes_and_dtypes_2d(Estimator, dtype, X, small):
    X = X.astype(dtype)
    est = Estimator(n_components=3, **small)
    Z = est.fit_transform(X)
    assert Z.shape == (40, 3) and Z.dtype == dtype
    np.testing.assert_array_equal(est.transform(X), Z)  # deterministic

    for z_dtype in (np.float32, np.float64):
        X_back = est.inverse_transform(Z.astype(z_dtype))
        assert X_back.shape == (40, 6) and X_back.dtype == z_dtype

    samples = est.sample(5, random_state=0)
    assert samples.shape == (5, 6) and samples.dtype == dtype  # training dtype

    scores = est.score_samples(X)
    assert scores.shape == (40,) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores))
    assert est.score(X) == pytest.approx(scores.mean())
    assert isinstance(est.score(X), float)

    assert est.n_features_in_ == 6
    assert est.input_shape_ == (6,)
    assert est.n_iter_ == small["max_iter"]
    assert len(est.history_["loss"]) == small["max_iter"]


def test_transform_of_other_dtype_follows_that_dtype(X, small):
    est = VAE(n_components=2, **small).fit(X)  # float64
    assert est.transform(X.astype(np.float32)).dtype == np.float32
    assert est.sample(2).dtype == np.float64
    assert est.transform(X.astype(np.int64)).dtype == np.float64


def test_inference_is_batched_and_batch_independent(small):
    # more samples than one inference batch (256)
    X = np.random.default_rng(0).normal(size=(600, 5))
    est = VAE(n_components=2, **small).fit(X[:50])
    Z = est.transform(X)
    assert Z.shape == (600, 2)
    np.testing.assert_allclose(Z[300:310], est.transform(X[300:310]), rtol=1e-5)
    scores = est.score_samples(X)
    np.testing.assert_allclose(
        scores[590:], est.score_samples(X[590:]), rtol=1e-5, atol=1e-5
    )
    assert est.sample(300, random_state=0).shape == (300, 5)


# ----------------------------------------------------------------------
# volumes and backbones
# ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "backbone, encoder_cls",
    [("conv", ConvEncoder3d), ("resnet", ResNetEncoder3d), ("auto", ConvEncoder3d)],
)
@pytest.mark.parametrize("shape", [(6, 9, 11, 7), (6, 2, 9, 11, 7)])
def test_volumes_keep_their_layout(backbone, encoder_cls, shape):
    X = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    est = VAE(
        n_components=3,
        backbone=backbone,
        channels=(4, 8),
        max_iter=2,
        batch_size=4,
        device="cpu",
        random_state=0,
    ).fit(X)
    assert isinstance(est.module_.encoder, encoder_cls)
    assert est.input_shape_ == shape[1:]
    assert est.n_features_in_ == int(np.prod(shape[1:]))
    Z = est.transform(X)
    assert Z.shape == (6, 3) and Z.dtype == np.float32
    X_back = est.inverse_transform(Z)
    assert X_back.shape == shape and X_back.dtype == np.float32
    assert est.sample(2, random_state=0).shape == (2, *shape[1:])
    scores = est.score_samples(X)
    assert scores.shape == (6,) and scores.dtype == np.float64
    assert np.all(np.isfinite(scores))


def test_auto_backbone_is_mlp_for_2d(X, small):
    est = VAE(n_components=2, **small).fit(X)
    assert isinstance(est.module_.encoder, MLPEncoder)


def test_mlp_backbone_on_volumes(volumes, small):
    est = VAE(n_components=2, backbone="mlp", **small).fit(volumes)
    assert isinstance(est.module_.encoder, MLPEncoder)
    assert est.inverse_transform(est.transform(volumes)).shape == volumes.shape


# ----------------------------------------------------------------------
# user (encoder, decoder) modules
# ----------------------------------------------------------------------
def _user_pair(n_features=6, n_components=2):
    # the encoder returns (n, 2, 5) features: their size (10) must be inferred
    encoder = nn.Sequential(
        nn.Linear(n_features, 10), nn.Tanh(), nn.Unflatten(1, (2, 5))
    )
    decoder = nn.Sequential(nn.Linear(n_components, 10), nn.Tanh(), nn.Linear(10, 6))
    return encoder, decoder


def test_user_modules_work_and_are_not_modified(X, small):
    encoder, decoder = _user_pair()
    before = [copy.deepcopy(m.state_dict()) for m in (encoder, decoder)]
    est = VAE(n_components=2, backbone=(encoder, decoder), **small).fit(X)
    assert est.module_.latent.linear.in_features == 10
    assert est.transform(X).shape == (40, 2)
    assert est.inverse_transform(est.transform(X)).shape == (40, 6)
    # training changed the copies, not the user's modules
    for module, state in zip((encoder, decoder), before):
        assert _same_state(module.state_dict(), state)
    assert est.module_.encoder is not encoder
    assert not _same_state(est.module_.decoder.state_dict(), before[1])
    assert est.get_params()["backbone"][0] is encoder  # parameter unchanged


def test_user_modules_on_volumes(volumes, small):
    # (n, x, y, z) volumes reach the modules as (n, 1, x, y, z)
    sample_shape = (1, *volumes.shape[1:])
    encoder = nn.Sequential(nn.Conv3d(1, 2, 3, stride=2), nn.SiLU())
    decoder = nn.Sequential(
        nn.Linear(2, int(np.prod(sample_shape))), nn.Unflatten(1, sample_shape)
    )
    est = VAE(n_components=2, backbone=(encoder, decoder), **small).fit(volumes)
    assert est.inverse_transform(est.transform(volumes)).shape == volumes.shape


def test_user_decoder_with_wrong_output_shape(X, small):
    encoder, _ = _user_pair()
    decoder = nn.Linear(2, 5)
    with pytest.raises(ValueError, match=r"decoder outputs samples of shape \(5,\)"):
        VAE(n_components=2, backbone=(encoder, decoder), **small).fit(X)


def test_user_modules_with_wrong_input_size(X, small):
    encoder, decoder = _user_pair()
    with pytest.raises(ValueError, match=r"decoder must map latent codes of shape"):
        VAE(n_components=3, backbone=(encoder, decoder), **small).fit(X)
    encoder, decoder = _user_pair(n_features=5)
    with pytest.raises(ValueError, match=r"encoder must map a batch of samples"):
        VAE(n_components=2, backbone=(encoder, decoder), **small).fit(X)


# ----------------------------------------------------------------------
# likelihoods
# ----------------------------------------------------------------------
@pytest.mark.parametrize("likelihood", ["gaussian", "laplace"])
@pytest.mark.parametrize("scale", ["global", "feature"])
def test_location_scale_likelihoods(likelihood, scale, X, small):
    est = VAE(
        n_components=2, likelihood=likelihood, likelihood_scale=scale, **small
    ).fit(X)
    assert type(est.module_.likelihood).__name__.lower().startswith(likelihood)
    expected = () if scale == "global" else (6,)
    assert tuple(est.module_.likelihood.scale.shape) == expected
    assert np.all(np.isfinite(est.score_samples(X)))


def test_likelihoods_give_different_scores(X, small):
    scores = {
        lik: VAE(n_components=2, likelihood=lik, **small).fit(X).score(X)
        for lik in ("gaussian", "laplace")
    }
    assert scores["gaussian"] != scores["laplace"]


def test_bernoulli_likelihood(small):
    X = np.random.default_rng(0).random((30, 8))
    est = VAE(n_components=2, likelihood="bernoulli", **small).fit(X)
    X_back = est.inverse_transform(est.transform(X))
    assert X_back.min() >= 0 and X_back.max() <= 1  # probabilities
    samples = est.sample(10, random_state=0)
    assert samples.min() >= 0 and samples.max() <= 1
    # the ELBO of binary data is a log-probability: at most 0
    assert np.all(est.score_samples(X) <= 0)


@pytest.mark.parametrize("low, high", [(-0.5, 1.0), (0.0, 1.5)])
def test_bernoulli_rejects_data_outside_unit_interval(low, high, small):
    X = np.random.default_rng(0).uniform(low, high, size=(30, 4))
    vae = VAE(n_components=2, likelihood="bernoulli", scaling=None, **small)
    with pytest.raises(ValueError, match=r"bernoulli.*\[0, 1\]"):
        vae.fit(X)
    # the default scaling ("auto": minmax for bernoulli) maps X into [0, 1]
    VAE(n_components=2, likelihood="bernoulli", **small).fit(X)
    with pytest.raises(ValueError, match=r"bernoulli.*\[0, 1\].*zscore"):
        vae.set_params(scaling="zscore").fit(X)


# ----------------------------------------------------------------------
# feature names
# ----------------------------------------------------------------------
def test_feature_names_out(X, small):
    vae = VAE(n_components=3, **small).fit(X)
    assert vae.get_feature_names_out().tolist() == ["vae0", "vae1", "vae2"]
    beta = BetaVAE(n_components=2, **small).fit(X)
    assert beta.get_feature_names_out().tolist() == ["betavae0", "betavae1"]
    with pytest.raises(NotFittedError):
        VAE().get_feature_names_out()


# ----------------------------------------------------------------------
# randomness
# ----------------------------------------------------------------------
@pytest.mark.parametrize("Estimator", ESTIMATORS)
def test_same_seed_same_model(Estimator, X, small):
    a = Estimator(n_components=2, **small).fit(X)
    b = Estimator(n_components=2, **small).fit(X)
    assert _same_state(_state(a), _state(b))
    np.testing.assert_array_equal(a.transform(X), b.transform(X))
    np.testing.assert_array_equal(a.score_samples(X), b.score_samples(X))
    np.testing.assert_array_equal(
        a.sample(4, random_state=3), b.sample(4, random_state=3)
    )
    assert a.history_["loss"] == b.history_["loss"]


def test_different_seeds_differ(X, small):
    a = VAE(n_components=2, **small).fit(X)
    b = VAE(n_components=2, **{**small, "random_state": 1}).fit(X)
    assert not _same_state(_state(a), _state(b))
    assert not np.array_equal(a.transform(X), b.transform(X))
    # full batches: the order of samples cannot matter, the initialisation does
    full = {**small, "batch_size": 40}
    a = VAE(n_components=2, **full).fit(X)
    b = VAE(n_components=2, **{**full, "random_state": 1}).fit(X)
    assert not np.allclose(a.transform(X), b.transform(X), atol=1e-2)
    c = VAE(n_components=2, **{**small, "random_state": None}).fit(X)
    d = VAE(n_components=2, **{**small, "random_state": None}).fit(X)
    assert not _same_state(_state(c), _state(d))


def test_random_state_instance(X, small):
    params = {**small, "random_state": np.random.RandomState(0)}
    a = VAE(n_components=2, **params).fit(X)
    params = {**small, "random_state": np.random.RandomState(0)}
    b = VAE(n_components=2, **params).fit(X)
    assert _same_state(_state(a), _state(b))


@pytest.mark.parametrize("random_state", [0, None])
def test_global_rng_untouched(random_state, X, small):
    np.random.seed(123)  # noqa: NPY002 - the legacy global generator is the point
    torch.manual_seed(123)
    np_state = np.random.get_state()[1].copy()  # noqa: NPY002
    torch_state = torch.get_rng_state().clone()
    est = VAE(n_components=2, **{**small, "random_state": random_state})
    est.fit(X)
    Z = est.transform(X)
    est.inverse_transform(Z)
    est.sample(3)
    est.sample(3, random_state=0)
    est.score_samples(X)
    est.score(X)
    np.testing.assert_array_equal(np.random.get_state()[1], np_state)  # noqa: NPY002
    assert torch.equal(torch.get_rng_state(), torch_state)


def test_sample_reproducible(X, small):
    est = VAE(n_components=2, **small).fit(X)
    np.testing.assert_array_equal(
        est.sample(5, random_state=7), est.sample(5, random_state=7)
    )
    np.testing.assert_array_equal(
        est.sample(5, random_state=np.random.RandomState(7)),
        est.sample(5, random_state=np.random.RandomState(7)),
    )
    assert not np.array_equal(
        est.sample(5, random_state=7), est.sample(5, random_state=8)
    )
    assert not np.array_equal(est.sample(5), est.sample(5))  # fresh draws
    samples = est.sample(50, random_state=0)
    assert np.unique(samples.round(6), axis=0).shape[0] == 50


def test_score_samples_deterministic(X, small):
    est = VAE(n_components=2, **small).fit(X)
    np.testing.assert_array_equal(est.score_samples(X), est.score_samples(X))


# ----------------------------------------------------------------------
# warm start
# ----------------------------------------------------------------------
def test_warm_start_continues(X, small):
    est = VAE(n_components=2, warm_start=True, **{**small, "max_iter": 2})
    est.fit(X)
    first = _state(est)
    history = list(est.history_["loss"])
    est.fit(X)
    assert est.n_iter_ == 4
    assert len(est.history_["loss"]) == 4
    assert est.history_["loss"][:2] == history
    assert not _same_state(first, _state(est))
    # it went on from the trained weights, not from a fresh initialisation
    assert est.history_["loss"][2] < est.history_["loss"][0]
    cold = VAE(n_components=2, **{**small, "max_iter": 2}).fit(X)
    assert _same_state(first, _state(cold))


def test_without_warm_start_fit_starts_over(X, small):
    est = VAE(n_components=2, **small).fit(X)
    first = _state(est)
    history = list(est.history_["loss"])
    est.fit(X)
    assert est.n_iter_ == small["max_iter"]
    assert est.history_["loss"] == history
    assert _same_state(first, _state(est))


def test_warm_start_keeps_the_input_shape(X, small):
    est = VAE(n_components=2, warm_start=True, **small).fit(X)
    with pytest.raises(ValueError, match="features"):
        est.fit(X[:, :5])


def test_refit_on_new_shape_without_warm_start(X, volumes, small):
    est = VAE(n_components=2, **small).fit(X)
    est.fit(volumes)
    assert est.input_shape_ == volumes.shape[1:]
    assert est.transform(volumes).shape == (8, 2)
    est.fit(X[:, :4])
    assert est.input_shape_ == (4,)
    assert est.transform(X[:, :4]).shape == (40, 2)


# ----------------------------------------------------------------------
# early stopping
# ----------------------------------------------------------------------
def test_early_stopping_restores_the_best_epoch(small):
    # pure noise: the validation loss wanders, its best epoch is not the last
    X = np.random.default_rng(0).normal(size=(60, 8))
    params = dict(
        small,
        n_components=2,
        early_stopping=True,
        n_iter_no_change=50,
        learning_rate_init=0.03,
        batch_size=8,
    )
    est = VAE(**{**params, "max_iter": 12}).fit(X)
    val_loss = est.history_["val_loss"]
    assert len(val_loss) == est.n_iter_ == 12
    assert "val_recon" in est.history_ and "val_kl" in est.history_
    assert est.best_epoch_ == int(np.argmin(val_loss))
    assert est.best_epoch_ < est.n_iter_ - 1  # else the test proves nothing
    # the kept weights are those at the end of the best epoch
    short = VAE(**{**params, "max_iter": est.best_epoch_ + 1}).fit(X)
    assert _same_state(_state(est), _state(short))


def test_early_stopping_stops(X, small):
    est = VAE(
        n_components=2,
        early_stopping=True,
        n_iter_no_change=2,
        tol=1e9,  # no epoch improves enough
        **{**small, "max_iter": 50},
    ).fit(X)
    assert est.n_iter_ == 3
    assert len(est.history_["val_loss"]) == 3


def test_no_early_stopping_keeps_the_last_epoch(X, small):
    est = VAE(n_components=2, **small).fit(X)
    assert est.best_epoch_ == est.n_iter_ - 1
    assert not any(key.startswith("val_") for key in est.history_)


class _InterruptingEncoder(nn.Module):
    """An encoder that raises KeyboardInterrupt after ``after`` training calls."""

    def __init__(self, after):
        super().__init__()
        self.linear = nn.Linear(6, 8)
        self.after = after
        self.calls = 0

    def forward(self, x):
        if self.training:
            self.calls += 1
            if self.calls > self.after:
                raise KeyboardInterrupt
        return torch.tanh(self.linear(x))


def test_keyboard_interrupt_keeps_the_last_complete_epoch(X, small):
    # 40 samples in batches of 16: three steps per epoch, stop in epoch 3
    decoder = nn.Linear(2, 6)
    est = VAE(n_components=2, backbone=(_InterruptingEncoder(7), decoder), **small)
    with pytest.warns(UserWarning, match="interrupted"):
        est.fit(X)
    assert est.n_iter_ == 2 == len(est.history_["loss"])
    assert est.transform(X).shape == (40, 2)  # usable
    encoder = _InterruptingEncoder(10**6)
    encoder.load_state_dict(est.backbone[0].state_dict())
    two = VAE(
        n_components=2, backbone=(encoder, decoder), **{**small, "max_iter": 2}
    ).fit(X)
    assert _same_state(_state(est), _state(two))


def test_keyboard_interrupt_in_the_first_epoch_leaves_no_model(X, small):
    est = VAE(
        n_components=2, backbone=(_InterruptingEncoder(1), nn.Linear(2, 6)), **small
    )
    with pytest.raises(KeyboardInterrupt):
        est.fit(X)
    with pytest.raises(NotFittedError):
        est.transform(X)


def test_failed_warm_fit_changes_nothing(X, small, monkeypatch):
    from neurovae.training import DivergenceError, Engine

    est = VAE(n_components=2, warm_start=True, **small).fit(X)
    state, history, n_iter = _state(est), copy.deepcopy(est.history_), est.n_iter_
    original, calls = Engine._train_epoch, []

    def diverge_in_second_epoch(self, batches):
        calls.append(None)
        if len(calls) == 2:
            raise DivergenceError("diverged")
        return original(self, batches)

    monkeypatch.setattr(Engine, "_train_epoch", diverge_in_second_epoch)
    with pytest.raises(DivergenceError):
        est.fit(X)
    assert len(calls) == 2  # one epoch of the warm fit was trained, then failed
    assert _same_state(state, _state(est))
    assert est.history_ == history
    assert est.n_iter_ == n_iter


def test_warm_start_refuses_a_changed_network(X, small):
    est = VAE(n_components=2, warm_start=True, **small).fit(X)
    est.set_params(n_components=3)
    with pytest.raises(ValueError, match="warm_start=True but parameters"):
        est.fit(X)
    est.set_params(n_components=2, max_iter=1)  # training settings may change
    est.fit(X)
    assert est.n_iter_ == small["max_iter"] + 1


def test_concurrent_fits_in_threads(X, small):
    # fits in threads neither disturb each other's seeds nor the global state
    from concurrent.futures import ThreadPoolExecutor

    serial = _state(VAE(n_components=2, **small).fit(X))
    torch.manual_seed(5)
    before = torch.get_rng_state()
    with ThreadPoolExecutor(4) as pool:
        models = list(pool.map(lambda _: VAE(n_components=2, **small).fit(X), range(4)))
    assert all(_same_state(serial, _state(m)) for m in models)
    assert torch.equal(torch.get_rng_state(), before)


@pytest.mark.parametrize(
    "input_shape, n_samples, expected",
    [
        ((64,), 500, 200),
        ((64,), 30, 30),
        ((32, 32, 32), 500, 64),
        ((2, 32, 32, 32), 500, 32),
        ((91, 109, 91), 500, 2),
        ((300, 300, 300), 9, 1),
    ],
)
def test_auto_batch_size_bounds_the_voxels(input_shape, n_samples, expected):
    # batch_size="auto" is MLPRegressor's min(200, n) for features, and holds
    # about 2 million voxels for volumes, so brain-sized data fits in memory
    est = VAE()
    est.input_shape_ = input_shape
    est.n_features_in_ = int(np.prod(input_shape))
    assert est._resolved_batch_size(n_samples) == expected


def test_early_stopping_needs_enough_samples(X, small):
    est = VAE(n_components=2, early_stopping=True, validation_fraction=0.9, **small)
    with pytest.raises(ValueError, match="validation_fraction"):
        est.fit(X[:3])


# ----------------------------------------------------------------------
# BetaVAE schedules and capacity
# ----------------------------------------------------------------------
def test_beta_constant(X, small):
    est = BetaVAE(n_components=2, beta=3.0, **{**small, "max_iter": 4}).fit(X)
    assert est.history_["beta"] == [3.0] * 4
    assert est.module_.beta == 3.0
    vae = VAE(n_components=2, beta=0.5, **small).fit(X)
    assert vae.history_["beta"] == [0.5] * small["max_iter"]


def test_beta_linear_schedule(X, small):
    est = BetaVAE(
        n_components=2,
        beta=4.0,
        beta_schedule="linear",
        warmup_iter=3,
        **{**small, "max_iter": 5, "batch_size": 10},
    ).fit(X)
    beta = est.history_["beta"]
    assert len(beta) == 5
    assert 0 < beta[0] < beta[1] < beta[2] < 4.0
    assert beta[3:] == [4.0, 4.0]


def test_beta_cyclical_schedule(X, small):
    # two cycles of three epochs; four batches per epoch
    est = BetaVAE(
        n_components=2,
        beta=4.0,
        beta_schedule="cyclical",
        n_cycles=2,
        **{**small, "max_iter": 6, "batch_size": 10},
    ).fit(X)
    assert est.history_["beta"] == pytest.approx([2.0, 4.0, 4.0, 2.0, 4.0, 4.0])


def test_capacity_rises_over_the_whole_training_by_default(X, small):
    # one step per epoch: the logged target is C(epoch) = capacity * epoch / max_iter
    est = BetaVAE(
        n_components=2, capacity=4.0, **{**small, "max_iter": 4, "batch_size": 40}
    ).fit(X)
    assert est.history_["capacity"] == pytest.approx([0.0, 1.0, 2.0, 3.0])
    assert est.module_.capacity == 4.0  # the final target after training


def test_capacity(X, small):
    est = BetaVAE(
        n_components=2,
        capacity=5.0,
        gamma=10.0,
        capacity_iter=2,
        **{**small, "max_iter": 4, "batch_size": 10},
    ).fit(X)
    capacity = est.history_["capacity"]
    assert 0 < capacity[0] < capacity[1] <= 5.0
    assert capacity[2:] == [5.0, 5.0]
    assert est.history_["gamma"] == [10.0] * 4
    assert "beta" not in est.history_
    loss, recon, kl = (np.array(est.history_[k]) for k in ("loss", "recon", "kl"))
    # the objective is recon + gamma * |KL - C|, not recon + beta * KL
    assert np.all(loss >= recon - 1e-6)
    assert not np.allclose(loss, recon + 4.0 * kl)


# ----------------------------------------------------------------------
# bad input
# ----------------------------------------------------------------------
@pytest.mark.parametrize("value, word", [(np.nan, "NaN"), (np.inf, "infinity")])
@pytest.mark.parametrize("volume", [False, True])
def test_non_finite_input(value, word, volume, X, volumes, small):
    data = (volumes if volume else X).copy()
    data.flat[5] = value
    with pytest.raises(ValueError, match=word):
        VAE(n_components=2, **small).fit(data)
    fitted = VAE(n_components=2, **small).fit(volumes if volume else X)
    with pytest.raises(ValueError, match=word):
        fitted.transform(data)
    with pytest.raises(ValueError, match=word):
        fitted.score_samples(data)


@pytest.mark.parametrize(
    "shape, match",
    [
        ((0, 6), "0 sample"),
        ((1, 6), "1 sample"),
        ((0, 4, 4, 4), "0 sample"),
        ((1, 4, 4, 4), "1 sample"),
        ((5, 0), "0 feature"),
        ((5, 4, 0, 4), "empty axis"),
        ((5, 1, 4, 0, 4), "empty axis"),
    ],
)
def test_empty_or_single_sample_input(shape, match, small):
    with pytest.raises(ValueError, match=match):
        VAE(n_components=2, **small).fit(np.zeros(shape))


@pytest.mark.parametrize(
    "shape", [(6,), (5, 3, 3), (2, 1, 3, 3, 3, 3)], ids=["1-D", "3-D", "6-D"]
)
def test_wrong_rank(shape, small):
    with pytest.raises(ValueError) as info:
        VAE(n_components=2, **small).fit(np.zeros(shape))
    message = str(info.value)
    if len(shape) == 1:
        assert "2D array" in message
    else:
        assert "2-D" in message and "4-D" in message and "5-D" in message


def test_wrong_input_at_transform(X, volumes, small):
    flat = VAE(n_components=2, **small).fit(X)
    with pytest.raises(ValueError, match="5 features.*expecting 6"):
        flat.transform(X[:, :5])
    with pytest.raises(ValueError, match="fitted on samples of shape"):
        flat.transform(volumes)
    with pytest.raises(ValueError, match="2-D.*4-D"):
        flat.transform(X.reshape(40, 2, 3))
    with pytest.raises(ValueError, match="2D array"):
        flat.transform(X[0])

    vol = VAE(n_components=2, **small).fit(volumes)
    with pytest.raises(ValueError, match="fitted on volumes of shape"):
        vol.transform(volumes.reshape(8, -1))
    with pytest.raises(ValueError, match="fitted on samples of shape"):
        vol.transform(volumes[:, :, :, :6])
    with pytest.raises(ValueError, match="fitted on samples of shape"):
        vol.score_samples(volumes[:, None])  # an extra channel axis
    # one sample is fine after fit
    assert vol.transform(volumes[:1]).shape == (1, 2)


def test_wrong_latent_codes(X, small):
    est = VAE(n_components=2, **small).fit(X)
    with pytest.raises(ValueError, match="Z has 3 columns.*transform gives 2"):
        est.inverse_transform(np.zeros((4, 3)))
    with pytest.raises(ValueError, match="2D array"):
        est.inverse_transform(np.zeros(2))
    with pytest.raises(ValueError, match="NaN"):
        est.inverse_transform(np.full((4, 2), np.nan))


@pytest.mark.parametrize("n_samples", [0, -1, 2.0, True, "3"])
def test_bad_sample_arguments(n_samples, X, small):
    est = VAE(n_components=2, **small).fit(X)
    with pytest.raises(ValueError, match="n_samples"):
        est.sample(n_samples)


def test_bad_sample_random_state(X, small):
    est = VAE(n_components=2, **small).fit(X)
    with pytest.raises(ValueError, match="random_state"):
        est.sample(2, random_state="x")


def test_sparse_input(X, small):
    with pytest.raises(TypeError, match="[Ss]parse"):
        VAE(n_components=2, **small).fit(sp.csr_matrix(X))
    est = VAE(n_components=2, **small).fit(X)
    with pytest.raises(TypeError, match="[Ss]parse"):
        est.transform(sp.csr_matrix(X))


def test_not_fitted(X):
    est = VAE()
    for method in (est.transform, est.inverse_transform, est.score_samples):
        with pytest.raises(NotFittedError):
            method(X)
    with pytest.raises(NotFittedError):
        est.sample(2)


def test_failed_fit_leaves_no_fitted_model(X, small):
    est = VAE(n_components=2, backbone="conv", **small)
    with pytest.raises(ValueError, match="backbone='conv' needs volumes"):
        est.fit(X)
    with pytest.raises(NotFittedError):
        est.transform(X)
    # a failed refit does not leave the old model next to the new shape
    est.set_params(backbone="auto").fit(X)
    with pytest.raises(ValueError):
        est.set_params(likelihood="bernoulli", scaling=None).fit(X[:, :4])
    with pytest.raises(NotFittedError):
        est.transform(X[:, :4])


@pytest.mark.parametrize("backbone", ["conv", "resnet"])
def test_convolutional_backbone_on_2d(backbone, X, small):
    with pytest.raises(ValueError, match=f"backbone='{backbone}' needs volumes"):
        VAE(n_components=2, backbone=backbone, **small).fit(X)


# ----------------------------------------------------------------------
# parameter validation: at fit, naming the parameter
# ----------------------------------------------------------------------
BAD_PARAMETERS = [
    ("n_components", 0),
    ("n_components", 2.5),
    ("n_components", "2"),
    ("n_components", True),
    ("backbone", "transformer"),
    ("backbone", (nn.Linear(2, 2),)),
    ("hidden_layer_sizes", (0,)),
    ("hidden_layer_sizes", (16, -1)),
    ("hidden_layer_sizes", "16"),
    ("hidden_layer_sizes", 16),
    ("channels", ()),
    ("channels", (4, 0)),
    ("likelihood", "poisson"),
    ("likelihood_scale", "voxel"),
    ("beta", -1),
    ("beta", np.nan),
    ("beta", "1"),
    ("optimizer", "lbfgs"),
    ("learning_rate_init", 0),
    ("learning_rate_init", -1e-3),
    ("weight_decay", -1),
    ("max_grad_norm", 0),
    ("batch_size", 0),
    ("batch_size", "big"),
    ("batch_size", 1.5),
    ("max_iter", 0),
    ("max_iter", 2.0),
    ("early_stopping", "yes"),
    ("early_stopping", 1),
    ("validation_fraction", 1.0),
    ("validation_fraction", 0.0),
    ("n_iter_no_change", 0),
    ("tol", -1),
    ("device", "tpu"),
    ("device", 0),
    ("precision", "float16"),
    ("precision", "fp64"),
    ("random_state", "x"),
    ("random_state", -1),
    ("random_state", 1.5),
    ("verbose", -1),
    ("warm_start", "no"),
    ("warm_start", 0.0),
]

BAD_BETA_PARAMETERS = [
    ("beta_schedule", "cosine"),
    ("warmup_iter", 0),
    ("n_cycles", 0),
    ("capacity", -1),
    ("gamma", -1),
]


@pytest.mark.parametrize(
    "Estimator, name, value",
    [(VAE, *bad) for bad in BAD_PARAMETERS]
    + [(BetaVAE, *bad) for bad in BAD_PARAMETERS[:3] + BAD_BETA_PARAMETERS],
)
def test_bad_parameter_raises_at_fit(Estimator, name, value, X):
    params = {"hidden_layer_sizes": (8,), "max_iter": 1, "device": "cpu"}
    est = Estimator(**{**params, name: value})  # __init__ does not validate
    assert est.get_params()[name] is value
    with pytest.raises((ValueError, TypeError), match=name) as info:
        est.fit(X)
    assert "Traceback" not in str(info.value)
    assert not hasattr(est, "module_")


@pytest.mark.parametrize("device", ["cpu", "auto"])
@pytest.mark.parametrize(
    "Estimator", [VAE, BetaVAE, ContrastiveVAE, RecurrentVAE, VeryDeepVAE]
)
def test_float16_needs_a_cuda_device(Estimator, device, X):
    if device == "auto" and torch.cuda.is_available():
        pytest.skip("'auto' is a CUDA device here")
    rng = np.random.default_rng(0)
    args = {
        ContrastiveVAE: (X, np.arange(len(X)) % 2 == 0),
        RecurrentVAE: (rng.normal(size=(4, 5, 6)),),
        VeryDeepVAE: (rng.normal(size=(4, 8, 8, 8)).astype(np.float32),),
    }.get(Estimator, (X,))
    est = Estimator(max_iter=1, device=device, precision="16")
    with pytest.raises(ValueError, match="'16' needs a CUDA device; use 'bf16' on CPU"):
        est.fit(*args)
    assert not hasattr(est, "module_")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("Estimator", [VAE, ContrastiveVAE, RecurrentVAE])
def test_float16_fits_on_cuda(Estimator, X, small):
    rng = np.random.default_rng(0)
    args = {
        ContrastiveVAE: (X, np.arange(len(X)) % 2 == 0),
        RecurrentVAE: (rng.normal(size=(8, 5, 6)),),
    }.get(Estimator, (X,))
    params = {**small, "device": "cuda", "precision": "16", "max_iter": 20}
    est = Estimator(n_components=2, **params).fit(*args)
    history = est.history_
    assert next(est.module_.parameters()).dtype == torch.float32
    assert history["loss"][-1] < history["loss"][0]
    assert sum(history["n_skipped"]) == 0
    assert len(history["n_skipped_scaler"]) == 20
    Z = est.transform(args[0])
    assert np.isfinite(Z).all()


def test_unavailable_cuda_device(X, small):
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(ValueError, match="device='cuda'.*not available"):
        VAE(n_components=2, **{**small, "device": "cuda"}).fit(X)


@pytest.mark.parametrize(
    "name, value",
    [
        ("early_stopping", np.True_),
        ("n_components", np.int64(2)),
        ("beta", np.float32(0.5)),
        ("device", torch.device("cpu")),
        ("hidden_layer_sizes", [8, 4]),
        ("hidden_layer_sizes", ()),
        ("batch_size", 1000),
    ],
)
def test_good_parameter_variants(name, value, X, small):
    est = VAE(**{**small, "n_components": 2, name: value}).fit(X)
    assert est.transform(X).shape == (40, 2)
