"""VeryDeepVAE: the estimator face, its configurations, training and I/O."""

import inspect
import json
import pickle
import warnings

import nibabel as nib
import numpy as np
import pytest
import torch
from sklearn.base import clone
from sklearn.exceptions import NotFittedError
from sklearn.model_selection import cross_val_score

from neurovae import VeryDeepVAE, load
from neurovae.datasets import make_ellipsoids
from neurovae.nn import VeryDeepVAEModule, make_likelihood
from neurovae.training import DivergenceError
from neurovae.very_deep import (
    _CONFIG_FIXED,
    _CONFIG_PARAMETERS,
    _CONFIG_SAME,
    config_schema,
    read_config,
)

TINY = dict(
    channels=(4, 8, 8),
    channels_hidden=(2, 4, 4),
    channels_per_latent=(1, 2, 2),
    latents_per_resolution=(0, 1, 2),
    kernel_sizes=(1, 3, 3),
    max_iter=2,
    global_only_iter=1,  # one epoch with the spatial groups closed, one open
    batch_size=4,
    device="cpu",
    random_state=0,
)


@pytest.fixture
def volumes():
    rng = np.random.default_rng(0)
    return rng.normal(size=(10, 9, 10, 7)).astype(np.float32)  # odd grid: padded


def test_shapes_levels_and_outputs(volumes, one_thread):
    est = VeryDeepVAE(**TINY).fit(volumes)
    assert {"kl_level0", "kl_level1", "kl_level2", "n_skipped"} <= set(est.history_)
    Z = est.transform(volumes)
    top = est.module_.latent_shapes[0]
    assert Z.shape == (10, int(np.prod(top))) and Z.dtype == np.float32
    levels = est.transform_levels(volumes)
    assert [lv.shape[1:] for lv in levels] == est.module_.latent_shapes
    np.testing.assert_allclose(levels[0].reshape(10, -1), Z, rtol=1e-5, atol=1e-6)
    assert est.inverse_transform(Z).shape == volumes.shape
    assert est.reconstruct(volumes).shape == volumes.shape
    cold = est.sample(3, temperature=0.0, random_state=0)
    np.testing.assert_array_equal(cold, est.sample(3, temperature=0.0, random_state=1))
    warm = est.sample(3, random_state=0)
    np.testing.assert_array_equal(warm, est.sample(3, random_state=0))
    assert not np.allclose(warm, cold)
    bpv = est.bits_per_voxel(volumes)
    np.testing.assert_allclose(
        bpv, -est.score_samples(volumes) / (volumes[0].size * np.log(2))
    )


def test_images_in_images_out(volumes, one_thread):
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    imgs = [nib.Nifti1Image(v, affine) for v in volumes]
    est = VeryDeepVAE(**TINY).fit(imgs)
    out = est.sample(2)
    assert isinstance(out, nib.Nifti1Image) and out.shape == (9, 10, 7, 2)


def test_lists_of_the_wrong_length(volumes):
    with pytest.raises(
        ValueError, match="kernel_sizes has 2 entries but channels has 3"
    ):
        VeryDeepVAE(**{**TINY, "kernel_sizes": (1, 3)}).fit(volumes)


def test_needs_volumes():
    with pytest.raises(ValueError, match="needs volumes"):
        VeryDeepVAE(**TINY).fit(np.zeros((10, 5)))


def test_skip_threshold_and_ema_reach_the_engine(volumes, one_thread):
    est = VeryDeepVAE(**TINY, skip_threshold=1e12, ema_decay=0.9).fit(volumes)
    assert est.history_["n_skipped_large"] == [0, 0]


# ---------------------------------------------------------------------------
# configurations in the reference's key names
# ---------------------------------------------------------------------------
CONFIG = {  # TINY in the reference's terms
    "channels": [4, 8, 8],
    "channels_hidden": [2, 4, 4],
    "channels_per_latent": [1, 2, 2],
    "latent_feature_maps_per_resolution": [0, 1, 2],
    "kernel_sizes_bottom_up": [1, 3, 3],
    "kernel_sizes_top_down": [1, 3, 3],
    "channels_top_down": [4, 8, 8],
    "channels_hidden_top_down": [2, 4, 4],
    "total_epochs": 2,
    "batch_size": 4,
    "learning_rate": 1e-3,
    "gradient_clipping_value": 1e6,
    "gradient_skipping_value": 1e12,
    "warmup_iterations": 3,
    "train_frac": 0.8,
    # settings of the reference's script: accepted, not used, no warning
    "plot_recons_period": 1,
    "use_DDP": True,
    "verbose": True,
}
DEFAULTS = dict(
    max_iter=2, global_only_iter=1, batch_size=4, device="cpu", random_state=0
)


def test_config_sets_the_parameters_it_names(volumes, one_thread):
    est = VeryDeepVAE(**DEFAULTS, channels=(16, 16, 16), config=CONFIG)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # script settings do not warn
        est.fit(volumes)
    assert est.config_params_ == {
        "channels": [4, 8, 8],
        "channels_hidden": [2, 4, 4],
        "channels_per_latent": [1, 2, 2],
        "latents_per_resolution": [0, 1, 2],
        "kernel_sizes": [1, 3, 3],
        "max_iter": 2,
        "batch_size": 4,
        "learning_rate_init": 1e-3,
        "max_grad_norm": 1e6,
        "skip_threshold": 1e12,
        "skip_warmup_steps": 3,
        "validation_fraction": 0.2,
    }
    assert est.get_params()["channels"] == (16, 16, 16)  # as set
    assert est._structure()["channels"] == (4, 8, 8)  # as configured
    # the same model as the parameters spelled out
    ref = VeryDeepVAE(
        **{**TINY, "learning_rate_init": 1e-3, "max_grad_norm": 1e6},
        skip_threshold=1e12,
        skip_warmup_steps=3,
    ).fit(volumes)
    np.testing.assert_array_equal(est.transform(volumes), ref.transform(volumes))
    assert est.history_["loss"] == ref.history_["loss"]


def test_config_from_a_json_file(volumes, tmp_path, one_thread):
    path = tmp_path / "model.json"
    path.write_text(json.dumps(CONFIG))
    a = VeryDeepVAE(**DEFAULTS, config=str(path)).fit(volumes)
    b = VeryDeepVAE(**DEFAULTS, config=path).fit(volumes)
    c = VeryDeepVAE(**DEFAULTS, config=CONFIG).fit(volumes)
    assert a.history_["loss"] == b.history_["loss"] == c.history_["loss"]
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        VeryDeepVAE(config=path).fit(volumes)


def test_config_is_checked_against_the_schema(volumes):
    bad = {**CONFIG, "chanels": [4, 8, 8], "total_epochs": "2", "batch_size": 0}
    with pytest.raises(ValueError, match="does not follow the schema") as info:
        VeryDeepVAE(config=bad).fit(volumes)
    message = str(info.value)
    assert "'chanels' was unexpected" in message  # every error is listed
    assert "total_epochs: '2' is not of type 'integer'" in message
    assert "batch_size: 0 is less than or equal to the minimum of 0" in message
    assert not hasattr(VeryDeepVAE(config=bad), "config_params_")
    with pytest.raises(ValueError, match="parameter 'config' must be"):
        VeryDeepVAE(config=3).fit(volumes)


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"likelihood": "Bernoulli"}, "Gaussian likelihood only"),
        ({"kernel_sizes_top_down": [1, 3, 1]}, "one kernel size per resolution"),
        ({"channels_top_down": [4, 8, 16]}, "widths of the bottom-up one"),
        ({"resolution": 32}, "written for volumes of 32x32x32 voxels"),
        ({"nii_target_shape": [9, 10, 8]}, "X has 9x10x7"),
        ({"channels": [4, 8], "channels_top_down": [4, 8]}, "channels has 2"),
    ],
)
def test_config_asks_for_what_neurovae_does_not_do(volumes, change, match):
    est = VeryDeepVAE(**DEFAULTS, config={**CONFIG, **change})
    with pytest.raises(ValueError, match=match):
        est.fit(volumes)
    assert not hasattr(est, "config_params_")


def test_config_half_precision_is_float16(volumes):
    assert read_config({**CONFIG, "half_precision": True})[0]["precision"] == "16"
    assert "precision" not in read_config({**CONFIG, "half_precision": False})[0]
    est = VeryDeepVAE(**DEFAULTS, precision="bf16")
    est.set_params(config={**CONFIG, "half_precision": True})
    with pytest.raises(ValueError, match="'16' needs a CUDA device"):
        est.fit(volumes)  # on the CPU: the config's float16 is in effect


def test_reference_switches_built_another_way_warn(volumes, one_thread):
    config = {
        **CONFIG,
        "use_tanh_output": True,
        "l2_reg_coeff": 1e-4,
        "normalise_weight_by_depth": True,  # what neurovae does: no warning
        "output_activation_function": "identity",
    }
    with pytest.warns(UserWarning, match="l2_reg_coeff=0.0001, use_tanh_output=True"):
        VeryDeepVAE(**DEFAULTS, config=config).fit(volumes)


def test_reference_example_configuration_reads(tmp_path):
    """The 32³ example of the reference (its 6 resolutions down to 1³, kernel
    2 near the top), as its repository ships it."""
    config = {
        "total_epochs": 10, "batch_size": 64, "resolution": 32,
        "l2_reg_coeff": 1e-4, "learning_rate": 1e-3, "train_frac": 0.95,
        "half_precision": False, "print_model": False, "use_tanh_output": True,
        "warmup_iterations": 50, "gradient_clipping_value": 100,
        "gradient_skipping_value": 1000000000000, "predict_x_var": True,
        "predict_x_var_with_sigmoid": True,
        "variance_hidden_clamp_bounds": [0.001, 1],
        "variance_output_clamp_bounds": [0.01, 1],
        "latent_feature_maps_per_resolution": [2, 5, 4, 3, 2, 1],
        "channels_per_latent": [20, 20, 20, 20, 20, 200],
        "channels": [20, 40, 60, 80, 100, 120],
        "kernel_sizes_bottom_up": [3, 3, 3, 3, 2, 1],
        "kernel_sizes_top_down": [3, 3, 3, 3, 2, 1],
        "channels_hidden": [20, 40, 60, 80, 100, 120],
        "channels_top_down": [20, 40, 60, 80, 100, 120],
        "channels_hidden_top_down": [20, 40, 60, 80, 100, 120],
        "latent_feature_maps_per_resolution_weight_sharing": "none",
        "convolutional_downsampling": False, "bottleneck_resnet_encoder": True,
        "normalise_weight_by_depth": True, "zero_biases": True,
        "latents_to_use": "all", "latents_to_optimise": "all",
        "visualise_training_pipeline_before_starting": True,
    }  # fmt: skip
    params, grid, not_applied = read_config(config)
    assert grid == (32, 32, 32)
    assert params["latents_per_resolution"] == [2, 5, 4, 3, 2, 1]
    assert params["kernel_sizes"] == [3, 3, 3, 3, 2, 1]
    assert params["skip_warmup_steps"] == 50
    assert params["validation_fraction"] == 0.05
    assert not_applied == [
        "l2_reg_coeff=0.0001",
        "predict_x_var=True",
        "use_tanh_output=True",
        "zero_biases=True",
    ]
    shapes = VeryDeepVAEModule(
        1,
        grid,
        params["channels"],
        params["channels_hidden"],
        params["channels_per_latent"],
        params["latents_per_resolution"],
        params["kernel_sizes"],
        make_likelihood("gaussian", (1, *grid), scale="feature"),
    ).latent_shapes
    assert shapes[0] == (200, 1, 1, 1) and shapes[-1] == (20, 32, 32, 32)
    assert len(shapes) == 17


def test_schema_ships_and_names_every_key_read():
    schema = config_schema()
    assert schema["additionalProperties"] is False
    read = {*_CONFIG_PARAMETERS, *_CONFIG_SAME, *_CONFIG_FIXED}
    read |= {"train_frac", "likelihood", "half_precision", "nii_target_shape"}
    assert read <= set(schema["properties"])


def test_too_many_resolutions_for_the_grid(volumes):
    five = dict(
        channels=(4,) * 5,
        channels_hidden=(2,) * 5,
        channels_per_latent=(1,) * 5,
        latents_per_resolution=(0, 0, 0, 0, 1),
        kernel_sizes=(1,) * 5,
    )
    with pytest.raises(ValueError, match="smallest side, 7, allows at most 3"):
        VeryDeepVAE(**{**TINY, **five}).fit(volumes)


# ---------------------------------------------------------------------------
# training
# ---------------------------------------------------------------------------
def test_skip_warmup_steps_reach_the_engine(volumes, one_thread):
    est = VeryDeepVAE(**TINY, skip_threshold=1e-12, skip_warmup_steps=6)
    est.set_params(max_grad_norm=1e12)
    est.fit(volumes)  # 3 steps per epoch: every step is in the warm-up
    assert est.history_["n_skipped_large"] == [0, 0]
    with pytest.raises(DivergenceError, match="skip_threshold"):
        est.set_params(skip_warmup_steps=0).fit(volumes)
    assert not hasattr(est, "module_")


def test_learns_ellipsoids(one_thread):
    X, _ = make_ellipsoids(48, shape=(16, 16, 16), random_state=0)
    train, test = X[:40], X[40:]
    params = dict(
        max_iter=20,  # 12 sufficed with global_only_fraction=0
        batch_size=4,
        warmup_iter=5,
        global_only_iter=2,
        learning_rate_init=5e-3,
    )
    est = VeryDeepVAE(**{**TINY, **params}).fit(train)
    assert est.history_["recon"][-1] < est.history_["recon"][0]
    # reconstructions beat the mean image
    mean_error = ((test - train.mean(0)) ** 2).mean()
    assert ((est.reconstruct(test) - test) ** 2).mean() < 0.8 * mean_error
    # and the held-out ELBO beats independent voxels with their own mean and
    # variance (-0.52 bits per voxel here)
    mu, var = train.mean(0), train.var(0)
    nll = 0.5 * np.log(2 * np.pi * var) + 0.5 * (test - mu) ** 2 / var
    assert est.bits_per_voxel(test).mean() < nll.mean() / np.log(2) - 0.1


def test_bf16_and_checkpointing(volumes, one_thread):
    a = VeryDeepVAE(**TINY).fit(volumes)
    b = VeryDeepVAE(**TINY, gradient_checkpointing=True).fit(volumes)
    np.testing.assert_allclose(b.history_["loss"], a.history_["loss"], rtol=1e-5)
    c = VeryDeepVAE(**TINY, precision="bf16").fit(volumes)
    assert np.isfinite(c.history_["loss"]).all()
    assert np.isfinite(c.score_samples(volumes)).all()
    np.testing.assert_allclose(c.history_["loss"], a.history_["loss"], rtol=0.05)


def test_warm_start_refuses_a_new_architecture(volumes, one_thread):
    est = VeryDeepVAE(**TINY, warm_start=True).fit(volumes)
    est.set_params(config={"channels": [4, 8, 16]})
    with pytest.raises(ValueError, match="changed since the last fit: channels"):
        est.fit(volumes)
    assert est.config_params_ == {}  # the fitted model's, kept
    est.set_params(config=None).fit(volumes)
    assert est.n_iter_ == 4


@pytest.mark.parametrize("how", ["pickle", "safe"])
def test_round_trip_with_a_config(volumes, tmp_path, how, one_thread):
    est = VeryDeepVAE(**DEFAULTS, config=CONFIG, ema_decay=0.5).fit(volumes)
    if how == "pickle":
        loaded = pickle.loads(pickle.dumps(est))
    else:
        est.save(tmp_path / "model.nvae")
        loaded = load(tmp_path / "model.nvae")
    assert loaded.config_params_ == est.config_params_
    assert loaded.get_params() == est.get_params()
    for name in ("prior_mean", "prior_scale_tril"):  # the fitted global prior
        kept = getattr(loaded.module_.global_latent, name)
        assert torch.equal(kept, getattr(est.module_.global_latent, name))
    assert loaded.module_.global_latent.prior_mean.count_nonzero() > 0
    np.testing.assert_array_equal(loaded.transform(volumes), est.transform(volumes))
    np.testing.assert_array_equal(
        loaded.sample(2, random_state=0), est.sample(2, random_state=0)
    )
    np.testing.assert_array_equal(
        loaded.score_samples(volumes), est.score_samples(volumes)
    )
    # it keeps training with the configuration's parameters
    loaded.set_params(warm_start=True).fit(volumes)
    assert loaded.n_iter_ == 4


def test_scikit_learn_contract(volumes, one_thread):
    """The parts of the contract that do not need 2-D data (scikit-learn's
    own checks feed 2-D arrays, which this volume model refuses)."""
    est = VeryDeepVAE(**{**TINY, "global_only_iter": 0}, config={"total_epochs": 1})
    twin = clone(est)
    assert twin.get_params() == est.get_params()
    assert set(est.get_params()) == set(
        inspect.signature(VeryDeepVAE.__init__).parameters
    ) - {"self"}
    with pytest.raises(NotFittedError):
        est.transform(volumes)
    scores = cross_val_score(est, volumes, cv=2)
    assert scores.shape == (2,) and np.isfinite(scores).all()
    assert "kernel_sizes" in repr(est)


def test_bad_input(volumes, one_thread):
    bad = volumes.copy()
    bad[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        VeryDeepVAE(**TINY).fit(bad)
    est = VeryDeepVAE(**TINY).fit(volumes)
    with pytest.raises(ValueError, match="temperature"):
        est.sample(2, temperature=-1.0)
    with pytest.raises(ValueError):
        est.transform(volumes[:, :5])  # another grid
    with pytest.raises(ValueError):
        est.inverse_transform(np.zeros((2, 3)))  # not the top group's width
    with pytest.raises(ValueError, match="n_transform_groups=9 but the model has 4"):
        est.set_params(n_transform_groups=9).transform(volumes)


# ---------------------------------------------------------------------------
# the global latent
# ---------------------------------------------------------------------------
def test_global_latent_trains_alone_first(volumes, one_thread):
    est = VeryDeepVAE(**{**TINY, "max_iter": 3, "global_only_iter": 2}).fit(volumes)
    assert est.module_.latent_shapes[0] == (8,)
    assert est.transform(volumes).shape == (10, 8)
    spatial = np.sum([est.history_[f"kl_level{r}"] for r in range(3)], axis=0)
    np.testing.assert_array_equal(spatial[:2], 0.0)  # closed: no information
    assert spatial[2] > 0
    assert min(est.history_["kl_global"]) > 0
    with pytest.warns(UserWarning, match="never open"):
        VeryDeepVAE(**{**TINY, "global_only_iter": 2}).fit(volumes)
    # a warm start continues the schedule: the groups are open already
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        est.set_params(warm_start=True, max_iter=1).fit(volumes)
    assert sum(est.history_[f"kl_level{r}"][-1] for r in range(3)) > 0


def test_global_only_fraction_trains_volumes_through_the_global_latent(
    volumes, one_thread
):
    def spatial_kl(est):
        return np.sum([est.history_[f"kl_level{r}"] for r in range(3)], axis=0)

    # epoch 1 closed, epoch 2 open: with 1, every volume draws its spatial
    # groups from the priors, so they carry nothing; the global latent does
    est = VeryDeepVAE(**TINY, global_only_fraction=1.0).fit(volumes)
    assert est.module_.global_only_fraction == 1.0
    assert est.history_["global_only_fraction"] == [1.0, 1.0]
    np.testing.assert_array_equal(spatial_kl(est), 0.0)
    assert min(est.history_["kl_global"]) > 0
    # with 0.5, about half of the volumes: less spatial KL than with 0
    half = VeryDeepVAE(**TINY, global_only_fraction=0.5).fit(volumes)
    plain = VeryDeepVAE(**TINY, global_only_fraction=0.0).fit(volumes)
    assert 0 < spatial_kl(half)[1] < spatial_kl(plain)[1]
    # scores use every group's posterior whatever the fraction
    module = half.module_
    module.global_only_fraction = 0.0
    score = half.score(volumes)
    module.global_only_fraction = 1.0
    assert half.score(volumes) == score
    # a warm start can turn it off, and it survives a pickle round trip
    again = pickle.loads(pickle.dumps(est))
    assert again.module_.global_only_fraction == 1.0
    est.set_params(warm_start=True, max_iter=1, global_only_fraction=0.0)
    est.fit(volumes)
    assert est.module_.global_only_fraction == 0.0
    assert spatial_kl(est)[-1] > 0


def posterior_gaussian(est, X):
    """Mean and covariance of the global latent's aggregate posterior."""
    module = est.module_.eval()
    with torch.no_grad():
        x = est._to_tensor(X, est._preprocessing())
        q_mean, q_logstd = module.global_latent.posterior_params(
            module.bottom_up(x)[-1]
        )
    m = q_mean.double().numpy()
    cov = np.cov(m.T, bias=True) + np.diag(
        np.exp(2 * q_logstd.double().numpy()).mean(0)
    )
    return m.mean(0), cov


def test_global_prior_is_fitted_to_the_training_posteriors(volumes, one_thread):
    fitted = VeryDeepVAE(**TINY).fit(volumes)
    glob = fitted.module_.global_latent
    mean, cov = posterior_gaussian(fitted, volumes)
    np.testing.assert_allclose(glob.prior_mean.numpy(), mean, rtol=1e-4, atol=1e-5)
    tril = glob.prior_scale_tril.double().numpy()
    np.testing.assert_allclose(tril @ tril.T, cov, rtol=1e-4, atol=1e-5)
    # the same training with the standard normal kept
    standard = VeryDeepVAE(**TINY, global_prior="standard").fit(volumes)
    glob = standard.module_.global_latent
    assert glob.prior_mean.count_nonzero() == 0
    assert torch.equal(glob.prior_scale_tril, torch.eye(8))
    np.testing.assert_array_equal(
        standard.transform(volumes), fitted.transform(volumes)
    )
    assert not np.allclose(
        standard.sample(2, random_state=0), fitted.sample(2, random_state=0)
    )
    # the fitted prior is closer to the training posteriors: a higher ELBO
    assert fitted.score(volumes) > standard.score(volumes)


def test_warm_start_continues_its_checkpoint_after_the_prior_fit(
    volumes, tmp_path, one_thread
):
    est = VeryDeepVAE(**TINY, checkpoint_dir=tmp_path).fit(volumes)
    est.set_params(warm_start=True, max_iter=3).fit(volumes)  # not "another fit"
    assert est.n_iter_ == 5


def test_without_a_global_latent(volumes, one_thread):
    est = VeryDeepVAE(**TINY, global_latent_dim=0).fit(volumes)
    module = est.module_
    assert module.global_latent is None and len(module.latent_shapes[0]) == 4
    assert module.dec_groups[2][0].prior is None  # the standard normal group
    assert "kl_global" not in est.history_
    assert min(est.history_["kl_level2"]) > 0  # never closed


@pytest.mark.parametrize(
    "bad",
    [
        {"global_latent_dim": -1},
        {"global_latent_dim": 2.5},
        {"global_only_iter": -1},
        {"global_prior": "uniform"},
        {"global_only_fraction": -0.1},
        {"global_only_fraction": 1.5},
        {"global_only_fraction": float("nan")},
        {"global_only_fraction": "half"},
    ],
)
def test_global_latent_parameters_are_checked(volumes, bad):
    name = next(iter(bad))
    with pytest.raises(ValueError, match=name):
        VeryDeepVAE(**{**TINY, **bad}).fit(volumes)
