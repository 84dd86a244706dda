"""RecurrentVAE: does the fitted model recover known latent dynamics?

Three checks, printed side by side:

1. A known linear-Gaussian latent system (4 states, transition eigenvalues
   ``0.95 exp(+-0.3i)``, 0.8 and 0.5 in a random basis) observed through a
   random linear (or, with ``--mixing tanh``, nonlinear) map to 200 features
   plus noise. The eigenvalues of the fitted transition F against the true
   ones (sorted by modulus; eigenvalues do not depend on the latent basis),
   and the forecast error on held-out runs, 1 to 5 steps ahead, against a
   persistence baseline (the last frame repeated), the training mean, and an
   oracle (the true transition applied to the true last state, mapped by
   the true observation map: what a model that knew the system would
   predict). Both temporal losses
   ("kl" and the reference study's "mse" proxy).
2. ``make_fmri_cohort`` (two groups, the first network damped in patients,
   AR(1) latent time courses of coefficient 0.8): the eigenvalues of F, and
   the cross-validated accuracy of a logistic regression on ``transform``
   (a pipeline refitting the VAE in every fold), with the chance level.
   With ``--conv``, also a 3-D convolutional model on the NIfTI runs.
3. nibabel's bundled real fMRI run (``functional.nii``, 20 volumes): fit
   and forecast, with timings.

Run ``python benchmarks/bench_recurrent.py`` (about 3 minutes on one
thread; ``--conv`` adds about 2); ``--quick`` is a smoke test.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neurovae import RecurrentVAE
from neurovae.datasets import make_fmri_cohort


def linear_gaussian_system(seed: int = 0):
    """True transition (4 x 4) and observation map (4 x 200)."""
    rng = np.random.default_rng(seed)
    angle = 0.3
    block = np.zeros((4, 4))
    block[:2, :2] = 0.95 * np.array(
        [[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]]
    )
    block[2, 2], block[3, 3] = 0.8, 0.5
    basis, _ = np.linalg.qr(rng.standard_normal((4, 4)))
    transition = basis @ block @ basis.T
    loadings = rng.standard_normal((4, 200)) / 2.0
    return transition, loadings


def observe(states, loadings, mixing):
    signal = states @ loadings
    return np.tanh(signal) if mixing == "tanh" else signal


def simulate(transition, loadings, n_runs, n_timepoints, rng, mixing, noise=0.1):
    """Runs started from the stationary distribution, states noise 0.5."""
    k = len(transition)
    cov = np.eye(k)
    for _ in range(500):
        cov = transition @ cov @ transition.T + 0.25 * np.eye(k)
    h = rng.standard_normal((n_runs, k)) @ np.linalg.cholesky(cov).T
    states = []
    for _ in range(n_timepoints):
        states.append(h)
        h = h @ transition.T + 0.5 * rng.standard_normal((n_runs, k))
    states = np.stack(states, axis=1)
    signal = observe(states, loadings, mixing)
    runs = signal + noise * rng.standard_normal(signal.shape)
    return runs.astype(np.float32), states


def by_modulus(values):
    return values[np.argsort(-np.abs(values), kind="stable")]


def fmt_eig(values):
    return "  ".join(f"{v.real:+.3f}{v.imag:+.3f}i" for v in by_modulus(values))


def bench_linear_gaussian(args):
    print("== 1. known linear-Gaussian latent system " + "=" * 36)
    transition, loadings = linear_gaussian_system(0)
    rng = np.random.default_rng(1)
    n_train = 20 if args.quick else 60
    train, _ = simulate(transition, loadings, n_train, 40, rng, args.mixing)
    test, test_states = simulate(transition, loadings, 20, 40, rng, args.mixing)
    context, horizon = 35, 5
    target = test[:, context : context + horizon]
    persistence = np.repeat(test[:, context - 1 : context], horizon, axis=1)
    mean = np.broadcast_to(train.mean(axis=(0, 1)), target.shape)
    last = test_states[:, context - 1]
    oracle_states = []
    for _ in range(horizon):
        last = last @ transition.T
        oracle_states.append(last)
    oracle = observe(np.stack(oracle_states, axis=1), loadings, args.mixing)
    print(
        f"train: {n_train} runs x 40 time points x 200 features "
        f"({args.mixing} map, noise 0.1); test: 20 held-out runs, forecast "
        f"steps {context + 1}-{context + horizon} from the first {context}"
    )
    print(f"true eigenvalues of F       : {fmt_eig(np.linalg.eigvals(transition))}")
    errors = {}
    for loss in ("kl", "mse"):
        tic = time.perf_counter()
        model = RecurrentVAE(
            n_components=4,
            temporal_loss=loss,
            hidden_layer_sizes=(64,),
            learning_rate_init=3e-3,
            max_iter=20 if args.quick else 150,
            device="cpu",
            random_state=0,
        ).fit(train)
        seconds = time.perf_counter() - tic
        eig = np.linalg.eigvals(model.transition_)
        print(f"fitted, temporal_loss={loss!r:5} : {fmt_eig(eig)}  ({seconds:.0f} s)")
        errors[f"RecurrentVAE ({loss})"] = model.forecast(test[:, :context], horizon)
    errors.update(persistence=persistence, mean=mean, **{"true F, true state": oracle})
    print("forecast MSE per step ahead (held-out runs; observed frames):")
    print(f"  {'':22}" + "".join(f"{f't+{s + 1}':>8}" for s in range(horizon)))
    for name, prediction in errors.items():
        mse = ((prediction - target) ** 2).mean(axis=(0, 2))
        print(f"  {name:22}" + "".join(f"{v:8.3f}" for v in mse))


def bench_cohort(args):
    print("== 2. make_fmri_cohort: dynamics and group classification " + "=" * 20)
    n = 8 if args.quick else 20
    runs, y, info = make_fmri_cohort(
        n, n, 50, shape=(10, 10, 10), return_img=False, random_state=0
    )
    print(
        f"{2 * n} subjects ({n} controls, {n} patients), 50 time points, "
        f"10 x 10 x 10 voxels, AR(1) coefficient {info['ar_coef']} on 4 networks"
    )
    params = dict(
        n_components=4,
        backbone="mlp",
        hidden_layer_sizes=(64,),
        learning_rate_init=3e-3,
        max_iter=10 if args.quick else 60,
        device="cpu",
        random_state=0,
    )
    tic = time.perf_counter()
    model = RecurrentVAE(**params).fit(runs)
    seconds = time.perf_counter() - tic
    print(
        f"eigenvalues of F (MLP, all subjects): "
        f"{fmt_eig(np.linalg.eigvals(model.transition_))}  ({seconds:.0f} s)"
    )
    cv = StratifiedKFold(5, shuffle=True, random_state=0)
    pipe = make_pipeline(
        RecurrentVAE(**params), StandardScaler(), LogisticRegression(max_iter=1000)
    )
    chance = max(np.mean(y), 1 - np.mean(y))
    tic = time.perf_counter()
    scores = cross_val_score(pipe, runs, y, cv=cv)
    seconds = time.perf_counter() - tic
    print(
        "5-fold CV accuracy, RecurrentVAE (refitted per fold) + logistic "
        f"regression: {scores.mean():.3f} +- {scores.std():.3f} "
        f"(chance {chance:.2f}; {seconds:.0f} s)"
    )
    probe = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    Z = model.transform(runs)
    names = model.get_feature_names_out()
    for block in ("mean", "std", "offset"):
        columns = [i for i, name in enumerate(names) if f"_{block}" in name]
        acc = cross_val_score(probe, Z[:, columns], y, cv=cv).mean()
        print(f"  columns {block!r:9} alone (model fitted on all runs): {acc:.3f}")
    if args.conv:
        imgs, y_img, _ = make_fmri_cohort(n, n, 50, shape=(10, 10, 10), random_state=0)
        tic = time.perf_counter()
        conv = RecurrentVAE(
            **{**params, "backbone": "conv", "max_iter": 10 if args.quick else 30},
            channels=(8, 16),
        ).fit(imgs)
        seconds = time.perf_counter() - tic
        acc = cross_val_score(probe, conv.transform(imgs), y_img, cv=cv).mean()
        print(
            f"conv backbone on the NIfTI runs ({seconds:.0f} s): eigenvalues "
            f"{fmt_eig(np.linalg.eigvals(conv.transition_))}; CV accuracy of "
            f"the embedding (model fitted on all runs, no labels): {acc:.3f}"
        )


def bench_nibabel(args):
    import nibabel as nib
    from nibabel.testing import data_path

    print("== 3. nibabel's bundled fMRI run " + "=" * 45)
    img = nib.load(os.path.join(data_path, "functional.nii"))
    halves = [img.slicer[..., :10], img.slicer[..., 10:]]
    tic = time.perf_counter()
    model = RecurrentVAE(
        n_components=3,
        channels=(8, 16),
        learning_rate_init=3e-3,
        max_iter=20 if args.quick else 200,
        device="cpu",
        random_state=0,
    ).fit(halves)
    fit_s = time.perf_counter() - tic
    tic = time.perf_counter()
    forecast = model.forecast([img.slicer[..., :15]], n_steps=5)[0]
    forecast_s = time.perf_counter() - tic
    data = img.get_fdata()
    truth = data[..., 15:20]
    mse = ((forecast.get_fdata() - truth) ** 2).mean()
    persistence = ((data[..., 14:15] - truth) ** 2).mean()
    run_mean = ((data[..., :15].mean(axis=3, keepdims=True) - truth) ** 2).mean()
    print(
        f"functional.nii {img.shape}: fitted on its two halves "
        f"({model.n_iter_} epochs, {fit_s:.1f} s); forecast of volumes 16-20 "
        f"from volumes 1-15 ({forecast_s:.2f} s): MSE {mse:.0f}, persistence "
        f"{persistence:.0f}, mean of volumes 1-15 {run_mean:.0f} (two runs of "
        "10 volumes are too few to learn dynamics: a smoke test)"
    )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smoke test")
    parser.add_argument("--conv", action="store_true", help="add a conv model")
    parser.add_argument("--mixing", choices=("linear", "tanh"), default="linear")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    tic = time.perf_counter()
    bench_linear_gaussian(args)
    bench_cohort(args)
    bench_nibabel(args)
    print(f"total {time.perf_counter() - tic:.0f} s")


if __name__ == "__main__":
    main()
