"""The synthetic data sets: shapes, determinism, ground truth, bad arguments."""

import nibabel as nib
import numpy as np
import pytest
import torch

from neurovae.datasets import (
    make_brain_population,
    make_contrastive,
    make_ellipsoids,
    make_fmri_cohort,
)

# Small calls of every generator, returning arrays only.
SMALL = {
    "ellipsoids": lambda **kw: make_ellipsoids(3, shape=(8, 9, 10), **kw),
    "brain": lambda **kw: make_brain_population(
        4, resolution=8, effect=0.3, return_img=False, **kw
    ),
    "fmri": lambda **kw: make_fmri_cohort(
        2, 2, 6, shape=(6, 7, 8), return_img=False, **kw
    ),
    "contrastive": lambda **kw: make_contrastive(6, 5, 7, **kw),
}


def _arrays(output):
    """Every array in a generator's output, in a fixed order."""
    if isinstance(output, dict):
        return [a for key in sorted(output) for a in _arrays(output[key])]
    if isinstance(output, tuple | list):
        return [a for item in output for a in _arrays(item)]
    return [np.asarray(output)]


def _same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(_arrays(a), _arrays(b)))


def _region_means(X, region):
    return X[:, region].mean(axis=1)


# ----------------------------------------------------------------------
# determinism and random state
# ----------------------------------------------------------------------
@pytest.mark.parametrize("name", SMALL)
def test_same_seed_same_output_other_seed_other_output(name):
    make = SMALL[name]
    first = make(random_state=0)
    assert _same(first, make(random_state=0))
    assert _same(first, make(random_state=np.random.RandomState(0)))
    assert not np.array_equal(_arrays(first)[0], _arrays(make(random_state=1))[0])


@pytest.mark.parametrize("name", SMALL)
def test_no_global_random_state_is_touched(name):
    make = SMALL[name]
    numpy_state = np.random.get_state()  # noqa: NPY002 (the global state)
    torch_state = torch.get_rng_state()
    first, second = make(random_state=None), make(random_state=None)
    make(random_state=5)
    after = np.random.get_state()  # noqa: NPY002
    assert after[0] == numpy_state[0] and np.array_equal(after[1], numpy_state[1])
    assert after[2:] == numpy_state[2:]
    assert torch.equal(torch.get_rng_state(), torch_state)
    # None draws fresh entropy: two calls differ.
    assert not np.array_equal(_arrays(first)[0], _arrays(second)[0])


# ----------------------------------------------------------------------
# make_ellipsoids
# ----------------------------------------------------------------------
def test_ellipsoids_shapes_dtypes_and_image_round_trip():
    X, params = make_ellipsoids(5, shape=(8, 9, 10), random_state=0)
    assert X.shape == (5, 8, 9, 10) and X.dtype == np.float32
    assert params["centers"].shape == (5, 3)
    assert params["radii"].shape == (5, 3)
    assert params["rotations"].shape == (5, 3, 3)
    assert params["intensities"].shape == (5,)

    img, img_params = make_ellipsoids(
        5, shape=(8, 9, 10), return_img=True, random_state=0
    )
    assert isinstance(img, nib.Nifti1Image)
    assert img.shape == (8, 9, 10, 5)
    np.testing.assert_array_equal(img.affine, np.eye(4))
    assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(np.moveaxis(img.get_fdata(), -1, 0), X)
    assert _same(params, img_params)


def test_ellipsoids_match_their_parameters():
    X, params = make_ellipsoids(20, shape=(32, 32, 32), noise=0.0, random_state=0)
    voxels = np.indices((32, 32, 32)).reshape(3, -1).T
    for volume, center, radii, rotation, intensity in zip(
        X,
        params["centers"],
        params["radii"],
        params["rotations"],
        params["intensities"],
    ):
        inside = (((voxels - center) @ rotation / radii) ** 2).sum(axis=1) <= 1
        np.testing.assert_array_equal(volume.reshape(-1) > 0, inside)
        np.testing.assert_allclose(volume.reshape(-1)[inside], intensity, rtol=1e-6)
        volume_expected = 4 / 3 * np.pi * radii.prod()
        assert abs(inside.sum() / volume_expected - 1) < 0.1
        # The whole ellipsoid lies inside the grid.
        assert np.all(center - radii.max() >= 0)
        assert np.all(center + radii.max() <= 31)
    assert np.all((params["radii"] >= 3.2) & (params["radii"] <= 8))
    assert np.all((params["intensities"] >= 0.5) & (params["intensities"] <= 1.5))


def test_ellipsoid_rotations_are_uniform_rotations():
    _, params = make_ellipsoids(2000, shape=(4, 4, 4), noise=0.0, random_state=0)
    rotations = params["rotations"]
    identity = np.broadcast_to(np.eye(3), rotations.shape)
    np.testing.assert_allclose(
        rotations @ rotations.transpose(0, 2, 1), identity, atol=1e-12
    )
    np.testing.assert_allclose(np.linalg.det(rotations), 1.0)
    # The Haar measure on SO(3) has a zero mean matrix.
    assert np.abs(rotations.mean(axis=0)).max() < 0.05


@pytest.mark.parametrize("smoothness", [0.0, 2.0])
def test_ellipsoid_background_has_the_requested_noise(smoothness):
    X, _ = make_ellipsoids(
        50, shape=(16, 16, 16), noise=0.5, smoothness=smoothness, random_state=0
    )
    clean, _ = make_ellipsoids(
        50, shape=(16, 16, 16), noise=0.0, smoothness=smoothness, random_state=0
    )
    background = X[clean == 0]
    assert abs(background.std() - 0.5) < 0.05
    # Neighbouring voxels are correlated only when smoothed.
    lag1 = np.corrcoef(X[:, :-1][clean[:, :-1] == 0], X[:, 1:][clean[:, :-1] == 0])
    assert (lag1[0, 1] > 0.5) == (smoothness > 0)


# ----------------------------------------------------------------------
# make_brain_population
# ----------------------------------------------------------------------
def test_brain_population_images_are_on_the_template_grid():
    from nilearn.datasets import load_mni152_gm_mask

    imgs, y, info = make_brain_population(2, random_state=0)
    template = load_mni152_gm_mask(resolution=4)
    assert isinstance(imgs, list) and len(imgs) == 2
    for img in imgs:
        assert isinstance(img, nib.Nifti1Image)
        assert img.shape == template.shape == (50, 59, 48)
        np.testing.assert_array_equal(img.affine, template.affine)
        assert img.get_data_dtype() == np.float32
    np.testing.assert_array_equal(info["mask"].get_fdata(), template.get_fdata())
    np.testing.assert_array_equal(info["affine"], template.affine)
    assert y.dtype.kind == "i" and y.tolist().count(1) == 1


def test_brain_population_arrays_round_trip_to_images():
    kwargs = dict(n_samples=3, resolution=8, effect=0.3, random_state=0)
    imgs, y_img, info_img = make_brain_population(**kwargs)
    X, y, info = make_brain_population(return_img=False, **kwargs)
    assert X.shape == (3, 26, 30, 25) and X.dtype == np.float32
    np.testing.assert_array_equal(np.stack([img.get_fdata() for img in imgs]), X)
    np.testing.assert_array_equal(y_img, y)
    assert info["mask"].dtype == bool
    for key in ("atrophy_map", "template", "mask"):
        assert isinstance(info_img[key], nib.Nifti1Image)
        np.testing.assert_array_equal(info_img[key].get_fdata(), info[key])
        np.testing.assert_array_equal(info_img[key].affine, info["affine"])
    np.testing.assert_array_equal(
        info["intensity_factors"], info_img["intensity_factors"]
    )


def test_brain_population_planted_atrophy_is_detectable():
    kwargs = dict(n_samples=40, resolution=8, return_img=False, random_state=0)
    X, y, info = make_brain_population(effect=0.3, **kwargs)
    X_null, y_null, info_null = make_brain_population(effect=0.0, **kwargs)

    atrophy = info["atrophy_map"]
    assert atrophy.max() == pytest.approx(0.3, abs=0.02)
    assert not info_null["atrophy_map"].any()
    region = (atrophy > 0.15) & info["mask"]
    assert region.sum() >= 5

    means = _region_means(X, region)
    patients, controls = means[y == 1], means[y == 0]
    spread = np.sqrt((patients.var() + controls.var()) / 2)
    assert (controls.mean() - patients.mean()) / spread > 1  # Cohen's d
    # Controls carry no effect: the same subjects as in the null data set.
    np.testing.assert_array_equal(y, y_null)
    np.testing.assert_array_equal(X[y == 0], X_null[y == 0])
    # Patients differ from their null twins only in and near the region.
    difference = (X_null - X)[y == 1].mean(axis=0)
    assert difference[region].mean() > 0.05
    assert np.abs(difference[atrophy < 1e-3]).max() < 0.02
    # Without an effect the groups do not differ in the region.
    null_means = _region_means(X_null, region)
    gap = null_means[y == 0].mean() - null_means[y == 1].mean()
    assert abs(gap) / spread < 1


def test_brain_population_ground_truth_factors():
    X, y, info = make_brain_population(
        30,
        resolution=8,
        n_patients=7,
        noise=0.0,
        bias_field=0.0,
        return_img=False,
        random_state=0,
    )
    assert y.tolist().count(1) == 7
    mask = info["mask"]
    ratio = X[:, mask].mean(axis=1) / info["template"][mask].mean()
    assert np.corrcoef(ratio, info["intensity_factors"])[0, 1] > 0.95
    # A custom centre moves the atrophy peak there.
    _, _, moved = make_brain_population(
        2,
        resolution=8,
        effect=0.5,
        effect_center=np.array([30, 10, 20]),
        return_img=False,
        random_state=0,
    )
    peak = np.unravel_index(moved["atrophy_map"].argmax(), mask.shape)
    peak_mm = moved["affine"] @ np.append(peak, 1)
    np.testing.assert_allclose(peak_mm[:3], (30, 10, 20), atol=4)
    np.testing.assert_array_equal(moved["effect_center"], (30, 10, 20))


def test_brain_population_without_variation_is_the_template():
    X, y, info = make_brain_population(
        3,
        resolution=8,
        deformation=0.0,
        intensity_variation=0.0,
        bias_field=0.0,
        noise=0.0,
        return_img=False,
        random_state=0,
    )
    for volume in X:
        np.testing.assert_allclose(volume, info["template"], atol=1e-6)


# ----------------------------------------------------------------------
# make_fmri_cohort
# ----------------------------------------------------------------------
def test_fmri_cohort_shapes_and_image_round_trip():
    kwargs = dict(n_timepoints=7, shape=(6, 7, 8), n_components=3, random_state=0)
    runs, y, info = make_fmri_cohort(2, 3, **kwargs)
    X, y_array, info_array = make_fmri_cohort(2, 3, return_img=False, **kwargs)
    assert X.shape == (5, 7, 6, 7, 8) and X.dtype == np.float32
    assert isinstance(runs, list) and len(runs) == 5
    for run, array in zip(runs, X):
        assert isinstance(run, nib.Nifti1Image) and run.shape == (6, 7, 8, 7)
        np.testing.assert_array_equal(run.affine, np.eye(4))
        np.testing.assert_array_equal(np.moveaxis(run.get_fdata(), -1, 0), array)
    np.testing.assert_array_equal(y, y_array)
    assert sorted(y.tolist()) == [0, 0, 1, 1, 1]
    assert info["patterns"].shape == (6, 7, 8, 3)
    patterns = info_array["patterns"]
    np.testing.assert_array_equal(
        np.moveaxis(info["patterns"].get_fdata(), -1, 0), patterns
    )
    np.testing.assert_array_equal(info["effect_mask"].get_fdata(), patterns[0] > 0)
    assert info_array["time_courses"].shape == (5, 7, 3)
    assert info_array["amplitudes"].shape == (5, 3)


@pytest.mark.parametrize("ar_coef", [-0.5, 0.0, 0.5, 0.8])
def test_fmri_time_courses_are_ar1_with_the_given_coefficient(ar_coef):
    _, _, info = make_fmri_cohort(
        10,
        10,
        200,
        shape=(4, 4, 4),
        ar_coef=ar_coef,
        return_img=False,
        random_state=0,
    )
    series = info["time_courses"]
    lag1 = (series[:, 1:] * series[:, :-1]).mean() / series.var()
    assert lag1 == pytest.approx(ar_coef, abs=0.05)
    assert series.var() == pytest.approx(1.0, abs=0.1)
    assert info["ar_coef"] == ar_coef


def test_fmri_runs_are_the_damped_patterns_times_the_time_courses():
    runs, y, info = make_fmri_cohort(
        3,
        3,
        20,
        shape=(8, 8, 8),
        effect=0.4,
        spatial_variation=0.0,
        noise=0.0,
        return_img=False,
        random_state=0,
    )
    patterns = info["patterns"]
    assert patterns.min() == 0 and np.allclose(patterns.max(axis=(1, 2, 3)), 1)
    np.testing.assert_allclose((patterns > 0).mean(axis=(1, 2, 3)), 0.2, atol=0.01)
    expected_amplitudes = np.ones((6, 4))
    expected_amplitudes[y == 1, 0] = 0.6
    np.testing.assert_array_equal(info["amplitudes"], expected_amplitudes)
    weights = info["time_courses"] * info["amplitudes"][:, None, :]
    expected = np.einsum("stk,kxyz->stxyz", weights, patterns)
    np.testing.assert_allclose(runs, expected, atol=1e-5)


def test_fmri_time_courses_are_recoverable_and_patients_damped():
    runs, y, info = make_fmri_cohort(
        10,
        10,
        100,
        shape=(10, 10, 10),
        effect=0.5,
        return_img=False,
        random_state=0,
    )
    patterns = info["patterns"].reshape(4, -1)
    data = runs.reshape(*runs.shape[:2], -1)
    estimated = data @ np.linalg.pinv(patterns)  # (subjects, time, components)
    truth = info["time_courses"] * info["amplitudes"][:, None, :]
    for est, true in zip(estimated, truth):
        for k in range(4):
            assert np.corrcoef(est[:, k], true[:, k])[0, 1] > 0.9
    # Patients carry about half the signal of pattern 0, the same elsewhere.
    std = estimated.std(axis=1)
    ratio = std[y == 1].mean(axis=0) / std[y == 0].mean(axis=0)
    assert ratio[0] == pytest.approx(0.5, abs=0.1)
    np.testing.assert_allclose(ratio[1:], 1.0, atol=0.15)


# ----------------------------------------------------------------------
# make_contrastive
# ----------------------------------------------------------------------
def test_contrastive_shapes_dtypes_and_labels():
    X, y, info = make_contrastive(30, 20, 9, n_shared=3, n_salient=2, random_state=0)
    assert X.shape == (50, 9) and X.dtype == np.float64
    assert y.dtype.kind == "i" and y.tolist().count(0) == 30
    assert set(y.tolist()) == {0, 1}
    assert info["shared_factors"].shape == (50, 3)
    assert info["salient_factors"].shape == (50, 2)
    assert info["shared_loadings"].shape == (3, 9)
    assert info["salient_loadings"].shape == (2, 9)
    assert not info["salient_factors"][y == 0].any()
    assert info["salient_factors"][y == 1].all()


def test_contrastive_data_is_the_documented_mixture():
    X, y, info = make_contrastive(10, 10, 6, noise=0.0, random_state=0)
    expected = (
        info["shared_factors"] @ info["shared_loadings"]
        + info["salient_factors"] @ info["salient_loadings"]
    )
    np.testing.assert_allclose(X, expected)


def test_only_target_data_leaves_the_span_of_the_shared_loadings():
    X, y, info = make_contrastive(
        300, 300, 40, n_shared=3, n_salient=2, noise=0.1, random_state=0
    )
    basis, _ = np.linalg.qr(info["shared_loadings"].T)  # (n_features, n_shared)
    residual = X - X @ basis @ basis.T
    background = np.sqrt((residual[y == 0] ** 2).mean())
    target = np.sqrt((residual[y == 1] ** 2).mean())
    # Background residual is the noise (in the 37 dimensions left out).
    assert background == pytest.approx(0.1, rel=0.1)
    assert target > 3 * background


# ----------------------------------------------------------------------
# bad arguments
# ----------------------------------------------------------------------
@pytest.mark.parametrize(
    "make, kwargs, match",
    [
        (make_ellipsoids, dict(n_samples=0), "'n_samples' must be an int"),
        (make_ellipsoids, dict(n_samples=2.5), "'n_samples'"),
        (make_ellipsoids, dict(shape=(8, 8)), "'shape' must be a sequence of three"),
        (make_ellipsoids, dict(shape=(8, 3, 8)), "ints >= 4"),
        (make_ellipsoids, dict(shape=8), "'shape'"),
        (make_ellipsoids, dict(noise=-1.0), "'noise' must be a float in"),
        (make_ellipsoids, dict(smoothness=np.nan), "'smoothness'"),
        (make_ellipsoids, dict(return_img="yes"), "'return_img'"),
        (make_ellipsoids, dict(random_state="seed"), "seed"),
        (make_brain_population, dict(n_samples=0), "'n_samples'"),
        (make_brain_population, dict(resolution=0), "'resolution'"),
        (make_brain_population, dict(resolution=2.5), "'resolution'"),
        (make_brain_population, dict(effect=1.5), "'effect' must be a float in"),
        (make_brain_population, dict(n_patients=41), r"'n_patients'.*\[0, 40\]"),
        (make_brain_population, dict(effect_center=(1, 2)), "'effect_center'"),
        (
            make_brain_population,
            dict(effect_center=(500, 0, 0)),
            "'effect_center' must lie inside the template grid",
        ),
        (make_brain_population, dict(effect_fwhm=0.0), "'effect_fwhm'"),
        (make_brain_population, dict(deformation=-1), "'deformation'"),
        (make_brain_population, dict(noise=-0.1), "'noise'"),
        (make_fmri_cohort, dict(n_controls=-1), "'n_controls'"),
        (make_fmri_cohort, dict(n_controls=0, n_patients=0), "sum to at least 1"),
        (make_fmri_cohort, dict(n_timepoints=1), "'n_timepoints'"),
        (make_fmri_cohort, dict(ar_coef=1.0), r"'ar_coef' must be a float in \(-1"),
        (make_fmri_cohort, dict(n_components=0), "'n_components'"),
        (make_fmri_cohort, dict(effect=-0.1), "'effect'"),
        (make_fmri_cohort, dict(shape=(16, 16, 2)), "'shape'"),
        (make_contrastive, dict(n_background=0), "'n_background'"),
        (make_contrastive, dict(n_target=0), "'n_target'"),
        (make_contrastive, dict(n_features=0), "'n_features'"),
        (make_contrastive, dict(n_shared=-1), "'n_shared'"),
        (make_contrastive, dict(salient_std=-1), "'salient_std'"),
    ],
)
def test_bad_arguments_raise_clear_value_errors(make, kwargs, match):
    with pytest.raises(ValueError, match=match):
        make(**kwargs)


def test_error_names_the_function_and_the_value():
    with pytest.raises(ValueError, match=r"make_contrastive: .* got -3\.$"):
        make_contrastive(n_features=-3)
