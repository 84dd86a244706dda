"""RecurrentVAE: sequences in, latent dynamics, forecasts and runs out."""

import os
import pickle

import nibabel as nib
import numpy as np
import pytest
from nibabel.testing import data_path
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import (
    check_get_params_invariance,
    check_no_attributes_set_in_init,
    check_parameters_default_constructible,
    check_set_params,
)

from neurovae import RecurrentVAE, load
from neurovae.datasets import make_fmri_cohort
from neurovae.nn import RecurrentVAEModule

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = dict(
    n_components=2,
    hidden_layer_sizes=(8,),
    channels=(4,),
    max_iter=2,
    device="cpu",
    random_state=0,
)


@pytest.fixture
def seqs():
    """6 runs of 8 time points and 5 features (float64)."""
    return np.random.default_rng(0).normal(size=(6, 8, 5))


@pytest.fixture
def vol_seqs():
    """5 runs of 6 volumes on a 5 x 6 x 4 grid (float32)."""
    rng = np.random.default_rng(1)
    return rng.normal(size=(5, 6, 5, 6, 4)).astype(np.float32)


@pytest.fixture
def runs():
    """4-D images of unequal lengths, one run each."""
    rng = np.random.default_rng(2)
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    return [
        nib.Nifti1Image(rng.normal(size=(5, 6, 4, t)).astype(np.float32), affine)
        for t in (6, 4, 5)
    ]


def simulate(n_runs, n_timepoints, seed=0, noise=0.1):
    """Runs from a known linear-Gaussian latent system, mapped linearly to 20
    features; returns the runs and the true transition."""
    rng = np.random.default_rng(seed)
    angle = 0.4
    transition = 0.9 * np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    )
    loadings = np.random.default_rng(100).normal(size=(2, 20))
    h = rng.normal(size=(n_runs, 2)) * 1.2
    states = []
    for _ in range(n_timepoints):
        states.append(h)
        h = h @ transition.T + 0.5 * rng.normal(size=h.shape)
    states = np.stack(states, axis=1)
    runs = states @ loadings + noise * rng.normal(size=(n_runs, n_timepoints, 20))
    return runs, transition


# ----------------------------------------------------------------------
# input forms
# ----------------------------------------------------------------------
def test_3d_arrays(seqs):
    model = RecurrentVAE(**TINY).fit(seqs)
    assert model.input_shape_ == (5,) and model.n_features_in_ == 5
    assert (model.n_sequences_, model.n_timepoints_) == (6, 8)
    Z = model.transform(seqs)
    assert Z.shape == (6, 6) and Z.dtype == np.float64
    assert model.transform(seqs.astype(np.float32)).dtype == np.float32
    trajectories = model.transform_sequence(seqs)
    assert len(trajectories) == 6
    assert trajectories[0].shape == (8, 2) and trajectories[0].dtype == np.float64


def test_5d_and_6d_arrays(vol_seqs):
    model = RecurrentVAE(**TINY).fit(vol_seqs)
    assert model.input_shape_ == (5, 6, 4)
    assert model.transform(vol_seqs).dtype == np.float32
    assert model.forecast(vol_seqs, 3).shape == (5, 3, 5, 6, 4)
    channels = vol_seqs[:, :, None].repeat(2, axis=2)  # (n, T, 2, x, y, z)
    model = RecurrentVAE(**TINY).fit(channels)
    assert model.input_shape_ == (2, 5, 6, 4)
    assert model.sample(2, 3, random_state=0).shape == (2, 3, 2, 5, 6, 4)


def test_list_of_arrays_of_unequal_lengths(seqs):
    X = [seqs[0], seqs[1, :3], seqs[2, :6], seqs[3]]
    model = RecurrentVAE(**TINY).fit(X)
    assert model.n_timepoints_ == 8
    assert [t.shape[0] for t in model.transform_sequence(X)] == [8, 3, 6, 8]
    assert [r.shape for r in model.reconstruct(X)] == [(8, 5), (3, 5), (6, 5), (8, 5)]
    # each run's result does not depend on the others or their padding
    alone = np.concatenate([model.transform([run]) for run in X])
    np.testing.assert_allclose(model.transform(X), alone, rtol=1e-5, atol=1e-6)
    scores = model.score_samples(X)
    alone = np.concatenate([model.score_samples([run]) for run in X])
    np.testing.assert_allclose(scores, alone, rtol=1e-5)


def test_images_and_nifti_outputs(runs):
    model = RecurrentVAE(**TINY).fit(runs)
    assert model.input_shape_ == (5, 6, 4)
    np.testing.assert_array_equal(model.affine_, runs[0].affine)
    Z = model.transform(runs)
    assert Z.shape == (3, 6) and Z.dtype == np.float32
    assert [t.shape for t in model.transform_sequence(runs)] == [
        (6, 2),
        (4, 2),
        (5, 2),
    ]
    for out, n in (
        (model.forecast(runs, 3), 3),
        (model.sample(2, 7, random_state=0), 7),
    ):
        assert isinstance(out, list)
        assert all(isinstance(img, nib.Nifti1Image) for img in out)
        assert out[0].shape == (5, 6, 4, n)
        np.testing.assert_array_equal(out[0].affine, runs[0].affine)
    recon = model.reconstruct(runs)
    assert [img.shape[3] for img in recon] == [6, 4, 5]
    errors = model.reconstruction_error(runs)
    assert errors[1].shape == (5, 6, 4, 4)
    assert np.all(errors[1].get_fdata() >= 0)
    typical = model.inverse_transform(Z)  # one frame per run, one 4-D image
    assert isinstance(typical, nib.Nifti1Image) and typical.shape == (5, 6, 4, 3)
    decoded = model.inverse_transform(model.transform_sequence(runs))
    assert [img.shape[3] for img in decoded] == [6, 4, 5]
    assert model.score_samples(runs).shape == (3,)
    assert np.all(np.isfinite(model.bits_per_voxel(runs)))


def test_file_paths(runs, tmp_path):
    paths = []
    for i, img in enumerate(runs):
        paths.append(str(tmp_path / f"run{i}.nii.gz"))
        img.to_filename(paths[-1])
    from_files = RecurrentVAE(**TINY).fit(paths)
    in_memory = RecurrentVAE(**TINY).fit(runs)
    np.testing.assert_allclose(
        from_files.transform(paths), in_memory.transform(runs), rtol=1e-6
    )


def test_nibabel_functional_image_fits_and_forecasts():
    # nibabel's bundled real fMRI run: 17 x 21 x 3 voxels, 20 volumes
    img = nib.load(os.path.join(data_path, "functional.nii"))
    assert img.shape == (17, 21, 3, 20)
    halves = [img.slicer[..., :10], img.slicer[..., 10:]]
    model = RecurrentVAE(**TINY).fit(halves)
    assert np.isfinite(model.history_["loss"]).all()
    forecast = model.forecast([img], n_steps=4)
    assert forecast[0].shape == (17, 21, 3, 4)
    assert np.isfinite(forecast[0].get_fdata()).all()


def test_nibabel_example4d_with_two_volumes():
    # the other bundled 4-D image has only two volumes: one transition per run
    img = nib.load(os.path.join(data_path, "example4d.nii.gz"))
    assert img.shape[3] == 2
    model = RecurrentVAE(**TINY).fit([img, img])
    assert model.forecast([img], n_steps=2)[0].shape == (*img.shape[:3], 2)


# ----------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------
def test_run_of_one_time_point_is_refused(seqs):
    with pytest.raises(ValueError, match=r"X\[1\] has 1 time point"):
        RecurrentVAE(**TINY).fit([seqs[0], seqs[1, :1]])
    model = RecurrentVAE(**TINY).fit(seqs)
    assert model.transform([seqs[0, :1]]).shape == (1, 6)  # inference: fine


def test_bad_image_inputs_are_refused(runs):
    affine = runs[0].affine
    three_d = nib.Nifti1Image(np.zeros((5, 6, 4), np.float32), affine)
    with pytest.raises(ValueError, match=r"X\[1\] is a 3-D image.*a run is a 4-D"):
        RecurrentVAE(**TINY).fit([runs[0], three_d])
    with pytest.raises(ValueError, match=r"list of 4-D images.*\[img\]"):
        RecurrentVAE(**TINY).fit(runs[0])
    other_grid = nib.Nifti1Image(np.zeros((5, 6, 5, 3), np.float32), affine)
    with pytest.raises(ValueError, match=r"X\[2\] has shape \(5, 6, 5\).*X\[0\]"):
        RecurrentVAE(**TINY).fit([runs[0], runs[1], other_grid])
    shifted = nib.Nifti1Image(runs[1].get_fdata(), np.eye(4))
    with pytest.raises(ValueError, match=r"X\[1\] has affine"):
        RecurrentVAE(**TINY).fit([runs[0], shifted])
    data = runs[1].get_fdata()
    data[1, 1, 1, 2] = np.nan
    with pytest.raises(ValueError, match=r"X\[1\].*NaN"):
        RecurrentVAE(**TINY).fit([runs[0], nib.Nifti1Image(data, affine)])
    model = RecurrentVAE(**TINY).fit(runs)
    with pytest.raises(ValueError, match="training grid"):
        model.transform([other_grid])


def test_bad_array_inputs_are_refused(seqs):
    bad = seqs.copy()
    bad[2, 3, 1] = np.nan
    with pytest.raises(ValueError, match=r"X\[2\] contains NaN"):
        RecurrentVAE(**TINY).fit(bad)
    with pytest.raises(ValueError, match="takes sequences.*X\\[None\\]"):
        RecurrentVAE(**TINY).fit(seqs[0])
    with pytest.raises(ValueError, match="got a 4-D array"):
        RecurrentVAE(**TINY).fit(seqs[..., None])
    with pytest.raises(ValueError, match="at least 2 runs"):
        RecurrentVAE(**TINY).fit(seqs[:1])
    with pytest.raises(ValueError, match=r"X\[1\] has frames of shape \(4,\)"):
        RecurrentVAE(**TINY).fit([seqs[0], seqs[1, :, :4]])
    model = RecurrentVAE(**TINY).fit(seqs)
    with pytest.raises(ValueError, match="fitted on frames of shape"):
        model.transform(seqs[..., :4])


@pytest.mark.parametrize(
    "param, value",
    [
        ("temporal_loss", "l2"),
        ("subject_effects", "random"),
        ("sigma_h", 0.0),
        ("sigma_x", -1.0),
        ("ridge_alpha", -0.1),
        ("subject_max_iter", 0),
    ],
)
def test_bad_parameters(seqs, param, value):
    with pytest.raises(ValueError, match=param):
        RecurrentVAE(**TINY, **{param: value}).fit(seqs)


# ----------------------------------------------------------------------
# the estimator contract
# ----------------------------------------------------------------------
def test_determinism(seqs):
    a = RecurrentVAE(**TINY).fit(seqs)
    b = RecurrentVAE(**TINY).fit(seqs)
    np.testing.assert_array_equal(a.transform(seqs), b.transform(seqs))
    np.testing.assert_array_equal(a.transition_, b.transition_)
    np.testing.assert_array_equal(
        a.sample(3, 4, random_state=1), b.sample(3, 4, random_state=1)
    )
    np.testing.assert_array_equal(a.score_samples(seqs), a.score_samples(seqs))
    c = RecurrentVAE(**{**TINY, "random_state": 1}).fit(seqs)
    assert not np.array_equal(a.transform(seqs), c.transform(seqs))


def test_history_and_transition(seqs):
    model = RecurrentVAE(**{**TINY, "max_iter": 3}).fit(seqs)
    for key in ("loss", "recon", "kl", "subject", "spectral_radius"):
        assert len(model.history_[key]) == 3
    F = model.transition_
    assert F.shape == (2, 2) and F.dtype == np.float64
    radius = np.abs(np.linalg.eigvals(F)).max()
    assert model.history_["spectral_radius"][-1] == pytest.approx(radius)
    assert isinstance(model.module_, RecurrentVAEModule)
    with pytest.raises(AttributeError, match="table"):
        model.subject_effects_  # noqa: B018


@pytest.mark.parametrize("subject_effects", ["amortized", "table", None])
def test_persistence(seqs, tmp_path, subject_effects):
    model = RecurrentVAE(**TINY, subject_effects=subject_effects).fit(seqs)
    expected = model.transform(seqs)
    path = tmp_path / "model.nvae"
    model.save(path)
    for restored in (load(path), pickle.loads(pickle.dumps(model))):
        np.testing.assert_allclose(restored.transform(seqs), expected, rtol=1e-6)
        np.testing.assert_array_equal(restored.transition_, model.transition_)
        assert restored.n_timepoints_ == 8 and restored.n_sequences_ == 6
        np.testing.assert_array_equal(
            restored.sample(2, random_state=0), model.sample(2, random_state=0)
        )


def test_clone_and_parameters():
    model = RecurrentVAE(n_components=3, ridge_alpha=0.5, subject_effects="table")
    assert clone(model).get_params() == model.get_params()
    name = "RecurrentVAE"
    check_parameters_default_constructible(name, model)
    check_no_attributes_set_in_init(name, model)
    check_get_params_invariance(name, model)
    check_set_params(name, model)
    assert RecurrentVAE().n_components == 10
    assert RecurrentVAE().__sklearn_tags__().input_tags.three_d_array


def test_pipeline_and_cross_validation():
    X, y, _ = make_fmri_cohort(
        6, 6, 6, shape=(5, 5, 5), return_img=False, random_state=0
    )
    pipe = make_pipeline(
        RecurrentVAE(**{**TINY, "backbone": "mlp"}), LogisticRegression()
    )
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and np.all((scores >= 0) & (scores <= 1))
    model = RecurrentVAE(**{**TINY, "backbone": "mlp"}).set_output(transform="pandas")
    frame = model.fit(X).transform(X)
    assert list(frame.columns) == list(model.get_feature_names_out())
    assert frame.columns[0] == "recurrentvae_mean0"
    assert frame.columns[-1] == "recurrentvae_offset1"


def test_inverse_transform_forms(seqs):
    model = RecurrentVAE(**TINY).fit(seqs)
    Z = model.transform(seqs)
    assert model.inverse_transform(Z).shape == (6, 5)
    assert model.inverse_transform(Z.astype(np.float32)).dtype == np.float32
    codes = model.transform_sequence(seqs)
    decoded = model.inverse_transform(codes)
    assert [d.shape for d in decoded] == [(8, 5)] * 6
    stacked = model.inverse_transform(np.stack(codes))
    np.testing.assert_allclose(stacked[0], decoded[0])
    with pytest.raises(ValueError, match="columns"):
        model.inverse_transform(Z[:, :4])


def test_warm_start_accumulates(seqs):
    model = RecurrentVAE(**{**TINY, "warm_start": True}).fit(seqs).fit(seqs)
    assert model.n_iter_ == 4 and len(model.history_["spectral_radius"]) == 4
    table = RecurrentVAE(**{**TINY, "warm_start": True, "subject_effects": "table"})
    table.fit(seqs)
    with pytest.raises(ValueError, match="same 6 training runs"):
        table.fit(seqs[:4])


def test_early_stopping_and_mse(seqs):
    model = RecurrentVAE(
        **{**TINY, "max_iter": 3},
        early_stopping=True,
        validation_fraction=0.34,
        temporal_loss="mse",
    ).fit(seqs)
    assert len(model.history_["val_loss"]) == 3


def test_fixed_observation_scale(seqs):
    model = RecurrentVAE(**TINY, sigma_x=0.3).fit(seqs)
    assert float(model.module_.likelihood.scale) == pytest.approx(0.3)


# ----------------------------------------------------------------------
# subject effects
# ----------------------------------------------------------------------
def test_table_effects(seqs):
    model = RecurrentVAE(**{**TINY, "max_iter": 5}, subject_effects="table")
    model.fit(seqs[:4])
    assert model.subject_effects_.shape == (4, 2)
    assert np.abs(model.subject_effects_).sum() > 0
    # new subjects: offsets fitted by the inner optimisation
    Z = model.transform(seqs[4:])
    assert Z.shape == (2, 6) and np.abs(Z[:, 4:]).sum() > 0
    one_step = model.set_params(subject_max_iter=1).transform(seqs[4:])
    assert not np.allclose(one_step[:, 4:], Z[:, 4:])  # the steps ran
    np.testing.assert_allclose(one_step[:, :4], Z[:, :4])  # states: unchanged
    model.set_params(subject_max_iter=50)
    assert model.forecast(seqs[4:], 2).shape == (2, 2, 5)
    assert np.isfinite(model.score_samples(seqs[4:])).all()
    assert model.sample(3, 2, random_state=0).shape == (3, 2, 5)


def test_amortized_effects_on_new_subjects(seqs):
    model = RecurrentVAE(**TINY).fit(seqs[:4])
    Z = model.transform(seqs[4:])
    assert Z.shape == (2, 6) and np.isfinite(Z).all()


def test_no_subject_effects(seqs):
    model = RecurrentVAE(**TINY, subject_effects=None).fit(seqs)
    assert model.transform(seqs).shape == (6, 4)
    assert model.get_feature_names_out()[-1] == "recurrentvae_std1"


# ----------------------------------------------------------------------
# learning
# ----------------------------------------------------------------------
def test_loss_falls_and_forecast_beats_persistence():
    train, transition = simulate(40, 30, seed=0)
    test, _ = simulate(20, 30, seed=1)
    model = RecurrentVAE(
        n_components=2,
        hidden_layer_sizes=(32,),
        max_iter=60,
        learning_rate_init=3e-3,
        device="cpu",
        random_state=0,
    ).fit(train)
    loss = model.history_["loss"]
    assert np.mean(loss[-5:]) < 0.8 * np.mean(loss[:5])
    forecast = model.forecast(test[:, :25], n_steps=5)
    target = test[:, 25:30]
    persistence = np.repeat(test[:, 24:25], 5, axis=1)
    model_error = ((forecast - target) ** 2).mean()
    persistence_error = ((persistence - target) ** 2).mean()
    assert model_error < 0.8 * persistence_error
    # the dynamics: a rotation with modulus 0.9, recovered up to the latent basis
    eig = np.linalg.eigvals(model.transition_)
    assert np.all(np.abs(np.abs(eig) - 0.9) < 0.25)
