"""VeryDeepVAE against a plain convolutional VAE on ellipsoid volumes.

The claim checked (issue "VeryDeepVAE"): on ``make_ellipsoids`` data of
32^3 voxels, a *default* ``neurovae.VeryDeepVAE`` reaches a better held-out
ELBO, in bits per voxel, than a ``neurovae.VAE`` of comparable parameter
count, and its samples look like ellipsoids.

Data, per seed ``s`` of ``--seeds``: ``make_ellipsoids(n_train + n_test,
shape=(32, 32, 32), random_state=s)``; the first ``n_train`` volumes are the
training set, the other ``n_test`` the held-out set. Both models are fitted
on the very same training array and scored on the very same held-out array.

Models (both with ``random_state=s`` and their default scaling, batch size
policy ``"auto"``, device ``"auto"``):

* ``VeryDeepVAE(random_state=s)``: the estimator's defaults; only
  ``max_iter`` may be changed, with ``--max-iter`` (default: the
  VeryDeepVAE's own default), and the script says so when it is.
* ``VAE(backbone="conv", channels=(16, 32, 64), n_components=32,
  random_state=s)`` with the same ``max_iter``: a single-latent
  convolutional VAE (every count is printed: ``sum(p.numel() for p in
  est.module_.parameters())``); ``VAE wide`` is the same with
  ``channels=(24, 48, 96)`` (925k parameters, more than the default
  VeryDeepVAE), and ``VAE voxel-sd`` the first with one noise scale per
  voxel (``--baselines`` chooses).

Figures, per model and seed:

* ``test bpv`` / ``train bpv``: mean bits per voxel of the held-out /
  training volumes, ``-score_samples(X) / (n_voxels * ln 2)``, i.e. the
  negative ELBO of the raw intensities (``score_samples`` adds the
  log-Jacobian of the scaling, so the two models' figures are comparable
  whatever scaling each fitted). Lower is better; for continuous data it may
  be negative. For the VeryDeepVAE this is ``bits_per_voxel``, checked
  against the formula. ``sd`` is the standard deviation over the held-out
  volumes.
* ``fit s``: wall time of ``fit``; ``s/epoch``: ``fit s`` over the epochs run
  and, in brackets, the median of ``history_["time"]`` (the engine's clock
  around each epoch);
* ``params``: the parameter count.

Then the means over seeds, the paired difference VeryDeepVAE - VAE in
held-out bits per voxel for each seed (negative: the VeryDeepVAE is better)
and how many seeds the VeryDeepVAE wins.

Samples: for each seed, ``--n-show`` real held-out volumes, VeryDeepVAE
samples at temperatures 1.0 and 0.6 (``sample(n, temperature=t,
random_state=s)``), samples of the same trained VeryDeepVAE with the
standard normal as the prior of its global latent instead of the fitted
one (``VD N(0,I)``, temperature 1; its held-out bits per voxel are printed
too) and, for contrast, VAE samples (``sample(n, random_state=s)``) are
saved to ``--out`` as a PNG (``samples_seed<s>.png``:
for each group a row of mid slices ``[:, :, 16]`` and a row of maximum
intensity projections along z, all on the same grey scale) and as arrays
(``samples_seed<s>.npz``). A rough numeric check goes with them, the
*ellipsoid fit*: threshold a volume at ``ELLIPSOID_THRESHOLD`` (0.4: the
ellipsoids of ``make_ellipsoids`` are 0.5 to 1.5 above a background of
smooth noise), keep the largest
connected blob, and take the intersection over union of that blob with the
solid ellipsoid of the same centre and second moments (about 0.98 for the
real volumes, lower for ragged or split blobs; 0 when nothing
exceeds the threshold). ``blobs`` is the number of connected blobs of at
least ``MIN_BLOB`` voxels (1.05 on average for real volumes: now and then
a noise blob).

Everything is written as JSON to ``<out>/results.json`` (or ``--json``).
Torch's thread count is the same for every fit (``--threads`` sets it;
otherwise torch's default, set by e.g. ``OMP_NUM_THREADS``); it is printed
and checked before each fit.

Runtime: the fits dominate. One seed with all baselines took about 15
minutes on one thread of a 2-core VM with the earlier VeryDeepVAE default
(``kernel_sizes=(1, 3, 3, 3)``); the current default costs more at the full
grid (426 s for its fit beside other jobs, against 179 s quiet).
``--baselines VAE`` leaves out the voxel-scale VAE.
``--seeds 0 --max-iter 2 --n-train 40 --n-test 10`` is a smoke test of
about 20 s (its numbers mean nothing).

Run ``python benchmarks/bench_very_deep.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from scipy import ndimage

from neurovae import VAE, VeryDeepVAE
from neurovae.datasets import make_ellipsoids

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import CPUWatch, finish_run, machine_info  # noqa: E402

SHAPE = (32, 32, 32)
N_VOXELS = math.prod(SHAPE)
# 100 training volumes keep the default run (3 seeds, 50 epochs) near 20
# minutes on 2 quiet cores; 200 take about twice as long
N_TRAIN = 100
N_TEST = 50
SEEDS = (0, 1, 2)
TEMPERATURES = (1.0, 0.6)
N_SHOW = 6
DEFAULT_OUT = "/tmp/neurovae_bench_very_deep"
# the baseline: a single-latent conv VAE of about the VeryDeepVAE's size
VAE_PARAMS = {"backbone": "conv", "channels": (16, 32, 64), "n_components": 32}
# the baselines: VAE's default global noise scale, and one scale per voxel as
# the VeryDeepVAE has (so that a win is not only the likelihood's)
BASELINES = {
    "VAE": VAE_PARAMS,
    "VAE voxel-sd": {**VAE_PARAMS, "likelihood_scale": "feature"},
    # a wider conv VAE (925k parameters, more than the default VeryDeepVAE)
    "VAE wide": {**VAE_PARAMS, "channels": (24, 48, 96)},
}
# make_ellipsoids: intensities in [0.5, 1.5], smooth background noise that
# exceeds 0.3 in a few small blobs per volume; at 0.4 real volumes give
# IoU ~0.98 and 1.05 blobs (40 volumes, seed 0)
ELLIPSOID_THRESHOLD = 0.4
MIN_BLOB = 8  # voxels; smaller blobs above the threshold are not counted


# ----------------------------------------------------------------------------
# measurements
# ----------------------------------------------------------------------------
def n_parameters(est) -> int:
    return int(sum(p.numel() for p in est.module_.parameters()))


def bits_per_voxel(est, X: np.ndarray) -> np.ndarray:
    """Negative ELBO (raw intensities) per volume in bits per voxel, by the
    formula (the estimators' ``bits_per_voxel`` is checked against it)."""
    return -est.score_samples(X) / (N_VOXELS * math.log(2))


def standard_prior_copy(vd):
    """A copy of a fitted VeryDeepVAE whose global latent has the standard
    normal prior instead of the fitted one (None without a global latent)."""
    if vd.module_.global_latent is None or vd.global_prior == "standard":
        return None
    standard = copy.deepcopy(vd).set_params(global_prior="standard")
    standard.module_.global_latent.reset_prior()
    return standard


def fit_and_score(est, X_train, X_test, threads: int) -> tuple[dict, object]:
    if torch.get_num_threads() != threads:
        raise RuntimeError(
            f"torch uses {torch.get_num_threads()} threads, expected {threads}"
        )
    tic = time.perf_counter()
    est.fit(X_train)
    fit_s = time.perf_counter() - tic
    tic = time.perf_counter()
    test = bits_per_voxel(est, X_test)
    train = bits_per_voxel(est, X_train)
    score_s = time.perf_counter() - tic
    epoch_times = list(est.history_.get("time", []))
    n_epochs = len(est.history_.get("loss", epoch_times))
    row = {
        "params": n_parameters(est),
        "test_bpv": float(test.mean()),
        "test_bpv_sd": float(test.std(ddof=1)) if len(test) > 1 else float("nan"),
        "train_bpv": float(train.mean()),
        "fit_s": fit_s,
        "n_epochs": n_epochs,
        "s_per_epoch": fit_s / n_epochs if n_epochs else float("nan"),
        "median_epoch_s": statistics.median(epoch_times)
        if epoch_times
        else float("nan"),
        "score_s": score_s,
        "batch_size": est._resolved_batch_size(len(X_train)),
        "device": str(est._module_device()),
        "torch_threads": torch.get_num_threads(),
        "final_loss": float(est.history_["loss"][-1])
        if est.history_.get("loss")
        else float("nan"),
        "intensity_scale": float(est.intensity_scale_),
        "test_bpv_per_volume": test.tolist(),
    }
    return row, est


def ellipsoid_fit(volume: np.ndarray) -> tuple[float, int]:
    """IoU of the largest blob above the threshold with its moment ellipsoid,
    and the number of blobs of at least ``MIN_BLOB`` voxels."""
    labels, n = ndimage.label(volume > ELLIPSOID_THRESHOLD)
    if n == 0:
        return 0.0, 0
    sizes = np.bincount(labels.ravel())[1:]
    n_blobs = int((sizes >= MIN_BLOB).sum())
    blob = labels == (int(np.argmax(sizes)) + 1)
    points = np.argwhere(blob).astype(float)
    if len(points) < 4:
        return 0.0, n_blobs
    center = points.mean(0)
    cov = np.cov(points - center, rowvar=False) + 1e-9 * np.eye(3)
    # a solid ellipsoid of semi-axes a_k has second moments a_k^2 / 5
    grid = np.indices(volume.shape).reshape(3, -1).T - center
    inside = (grid @ np.linalg.inv(5 * cov) * grid).sum(1) <= 1
    inside = inside.reshape(volume.shape)
    union = np.logical_or(inside, blob).sum()
    return float(np.logical_and(inside, blob).sum() / union), n_blobs


def shape_summary(volumes: np.ndarray) -> dict:
    fits = [ellipsoid_fit(v) for v in volumes]
    iou = [f[0] for f in fits]
    blobs = [f[1] for f in fits]
    return {
        "ellipsoid_iou_mean": float(np.mean(iou)),
        "ellipsoid_iou": iou,
        "n_blobs_mean": float(np.mean(blobs)),
        "n_blobs": blobs,
        # the share of volumes holding exactly one blob, as real ones do
        "one_blob_share": float(np.mean([b == 1 for b in blobs])),
        "max_mean": float(volumes.reshape(len(volumes), -1).max(1).mean()),
    }


def save_samples(groups: dict[str, np.ndarray], out: Path, seed: int) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(groups)
    n_show = max(len(v) for v in groups.values())
    real = groups[names[0]]
    vmin, vmax = float(np.percentile(real, 0.5)), float(real.max())
    fig, axes = plt.subplots(
        2 * len(names),
        n_show,
        figsize=(1.6 * n_show, 1.6 * 2 * len(names)),
        squeeze=False,
    )
    for g, name in enumerate(names):
        vols = groups[name]
        for j in range(n_show):
            for r, (img, what) in enumerate(
                (
                    (vols[j][:, :, SHAPE[2] // 2], "mid slice"),
                    (vols[j].max(2), "max proj."),
                )
                if j < len(vols)
                else ((None, ""), (None, ""))
            ):
                ax = axes[2 * g + r, j]
                ax.set_axis_off()
                if img is None:
                    continue
                ax.imshow(img.T, origin="lower", cmap="gray", vmin=vmin, vmax=vmax)
                if j == 0:
                    ax.set_title(f"{name}: {what}", fontsize=7, loc="left")
    fig.suptitle(f"make_ellipsoids 32^3, seed {seed}", fontsize=9)
    fig.tight_layout()
    path = out / f"samples_seed{seed}.png"
    fig.savefig(path, dpi=100)
    plt.close(fig)
    np.savez_compressed(
        out / f"samples_seed{seed}.npz",
        **{k.replace(" ", "_").replace("=", ""): v for k, v in groups.items()},
    )
    return path


# ----------------------------------------------------------------------------
# one seed
# ----------------------------------------------------------------------------
def run_seed(seed: int, args: argparse.Namespace, out: Path) -> dict:
    X, _ = make_ellipsoids(args.n_train + args.n_test, shape=SHAPE, random_state=seed)
    X_train, X_test = X[: args.n_train], X[args.n_train :]
    threads = torch.get_num_threads()
    result: dict = {"seed": seed, "models": {}}

    vd_kwargs = {"random_state": seed}
    if args.max_iter is not None:
        vd_kwargs["max_iter"] = args.max_iter
    vd = VeryDeepVAE(**vd_kwargs)
    max_iter = vd.max_iter
    models = {"VeryDeepVAE": vd}
    for name in args.baselines:
        models[name] = VAE(**BASELINES[name], max_iter=max_iter, random_state=seed)
    vae = models["VAE"]

    for name, est in models.items():
        row, _ = fit_and_score(est, X_train, X_test, threads)
        result["models"][name] = row
        print(
            f"  seed {seed} {name:<14} epochs={row['n_epochs']:>3} "
            f"batch={row['batch_size']} test {row['test_bpv']:+.4f} "
            f"train {row['train_bpv']:+.4f} bits/voxel | fit {row['fit_s']:.1f} s",
            flush=True,
        )
    # VeryDeepVAE.bits_per_voxel must be the formula used here
    own = vd.bits_per_voxel(X_test).mean()
    result["vd_bits_per_voxel_check"] = float(
        abs(own - result["models"]["VeryDeepVAE"]["test_bpv"])
    )

    # the same trained model with the standard normal as its global prior
    standard = standard_prior_copy(vd)
    if standard is not None:
        result["vd_standard_prior_test_bpv"] = float(
            bits_per_voxel(standard, X_test).mean()
        )
    samplers = {f"VeryDeepVAE T={t}": (vd, t) for t in TEMPERATURES}
    if standard is not None:
        samplers["VD N(0,I) T=1.0"] = (standard, 1.0)

    n_show = min(args.n_show, args.n_test)
    groups = {"real (held-out)": X_test[:n_show]}
    for name, (est, t) in samplers.items():
        groups[name] = np.asarray(est.sample(n_show, temperature=t, random_state=seed))
    groups["VAE"] = np.asarray(vae.sample(n_show, random_state=seed))
    # the shape check on more volumes than are drawn
    n_check = min(args.n_check, args.n_test)
    check = {"real (held-out)": X_test[:n_check]}
    for name, (est, t) in samplers.items():
        check[name] = np.asarray(
            est.sample(n_check, temperature=t, random_state=seed + 1000)
        )
    check["VAE"] = np.asarray(vae.sample(n_check, random_state=seed + 1000))
    result["shapes"] = {k: shape_summary(v) for k, v in check.items()}
    result["png"] = str(save_samples(groups, out, seed))
    return result


# ----------------------------------------------------------------------------
# report
# ----------------------------------------------------------------------------
def print_header(info: dict, args: argparse.Namespace, max_iter: int) -> None:
    print("=" * 78)
    print("neurovae very deep VAE benchmark (benchmarks/bench_very_deep.py)")
    print("=" * 78)
    print(
        f"neurovae {info['neurovae']} (git {info['git']}) | torch {info['torch']} | "
        f"numpy {info['numpy']} | Python {info['python']}"
    )
    print(f"platform: {info['platform']}")
    print(
        f"cpu: {info['cpu']} | cpu_count={info['cpu_count']} "
        f"usable={info['cpus_usable']} | torch threads={info['torch_threads']} "
        f"(interop {info['torch_interop_threads']}) | device={info['device']}"
        + (f" ({info['gpu']})" if "gpu" in info else "")
    )
    if "loadavg_start" in info:
        print(f"load average at start (1, 5, 15 min): {info['loadavg_start']}")
    default_iter = VeryDeepVAE().max_iter
    note = (
        "the VeryDeepVAE default"
        if max_iter == default_iter
        else f"set by --max-iter; NOT the VeryDeepVAE default {default_iter}"
    )
    print(
        f"data: make_ellipsoids({args.n_train} + {args.n_test}, shape=32^3, "
        f"random_state=seed) | seeds={args.seeds}"
    )
    print(
        f"max_iter={max_iter} for every model ({note}); each model's default "
        f"batch_size (VeryDeepVAE {VeryDeepVAE().batch_size!r}, VAE "
        f"{VAE().batch_size!r}: the resolved sizes are in the table)"
    )
    vd_desc = "VeryDeepVAE(random_state=seed" + (
        f", max_iter={max_iter})" if max_iter != default_iter else ")"
    )
    vae_desc = ", ".join(f"{k}={v!r}" for k, v in VAE_PARAMS.items())
    print(f"models: {vd_desc}  vs  VAE({vae_desc}, max_iter={max_iter}, ...)")
    if "VAE voxel-sd" in args.baselines:
        print(
            "         and the same VAE with likelihood_scale='feature' (VAE voxel-sd)"
        )
    print()


def print_results(results: dict) -> dict:
    seeds = results["seeds"]
    names = list(seeds[0]["models"])
    print()
    print(
        "Bits per voxel: negative ELBO of the raw intensities / (32^3 ln 2); "
        "lower is better."
    )
    head = (
        f"  {'model':<12}{'seed':>5}{'test bpv':>10}{'(sd)':>8}{'train bpv':>11}"
        f"{'fit s':>9}{'s/epoch':>9}{'(median)':>9}{'params':>10}"
    )
    print(head)
    for name in names:
        for r in seeds:
            m = r["models"][name]
            print(
                f"  {name:<14}{r['seed']:>5}{m['test_bpv']:>+10.4f}"
                f"{m['test_bpv_sd']:>8.4f}{m['train_bpv']:>+11.4f}"
                f"{m['fit_s']:>9.1f}{m['s_per_epoch']:>9.2f}"
                f"{m['median_epoch_s']:>9.2f}{m['params']:>10,}"
            )
    print()
    summary: dict = {"mean": {}}
    print(f"Means over {len(seeds)} seed(s):")
    for name in names:
        rows = [r["models"][name] for r in seeds]
        mean = {
            k: statistics.fmean(m[k] for m in rows)
            for k in ("test_bpv", "train_bpv", "fit_s", "s_per_epoch")
        }
        summary["mean"][name] = mean
        print(
            f"  {name:<14} test {mean['test_bpv']:+.4f}  train "
            f"{mean['train_bpv']:+.4f} bits/voxel | fit {mean['fit_s']:.1f} s, "
            f"{mean['s_per_epoch']:.2f} s/epoch | {rows[0]['params']:,} parameters"
        )
    summary["paired"] = {}
    for base in names[1:]:
        diffs = [
            r["models"]["VeryDeepVAE"]["test_bpv"] - r["models"][base]["test_bpv"]
            for r in seeds
        ]
        wins = sum(d < 0 for d in diffs)
        summary["paired"][base] = {
            "diff_test_bpv": diffs,
            "mean": statistics.fmean(diffs),
            "vd_wins": wins,
            "n_seeds": len(diffs),
        }
        print()
        print(
            f"Paired difference VeryDeepVAE - {base}, held-out bits/voxel "
            "(< 0: VDVAE better):"
        )
        print(
            "  "
            + ", ".join(f"seed {r['seed']}: {d:+.4f}" for r, d in zip(seeds, diffs))
        )
        print(
            f"  mean {statistics.fmean(diffs):+.4f}; VeryDeepVAE better on "
            f"{wins} of {len(diffs)} seed(s)"
        )
    if all("vd_standard_prior_test_bpv" in r for r in seeds):
        print(
            "  VeryDeepVAE with the standard normal global prior instead of the "
            "fitted one, held out: "
            + ", ".join(
                f"seed {r['seed']}: {r['vd_standard_prior_test_bpv']:+.4f}"
                for r in seeds
            )
        )
    check = max(r["vd_bits_per_voxel_check"] for r in seeds)
    print(f"  (VeryDeepVAE.bits_per_voxel vs the formula: max |diff| {check:.1e})")
    print()
    print(
        f"Samples: ellipsoid fit (IoU of the largest blob > {ELLIPSOID_THRESHOLD} "
        f"with its moment ellipsoid)\nand blobs >= {MIN_BLOB} voxels, mean over "
        f"{len(next(iter(seeds[0]['shapes'].values()))['ellipsoid_iou'])} "
        "volumes per seed and group:"
    )
    groups = list(seeds[0]["shapes"])
    print(
        f"  {'group':<20}" + "".join(f"{'seed ' + str(r['seed']):>16}" for r in seeds)
    )
    for g in groups:
        cells = ""
        for r in seeds:
            iou, blobs, one = (
                r["shapes"][g][k]
                for k in ("ellipsoid_iou_mean", "n_blobs_mean", "one_blob_share")
            )
            cells += f"{iou:>8.2f} / {blobs:<4.1f}/ {one:<5.2f}"
        print(f"  {g:<20}{cells}")
    print(
        "  (IoU / blobs / share with exactly one blob; real volumes: IoU ~0.98, "
        "~1 blob, share ~1)"
    )
    print("  figures: " + ", ".join(r["png"] for r in seeds))
    return summary


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Default VeryDeepVAE vs a conv VAE of about the same size on "
            "make_ellipsoids 32^3: held-out bits per voxel, fit time, samples."
        )
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=list(SEEDS),
        help="data and model seeds (default 0 1 2)",
    )
    parser.add_argument(
        "--max-iter",
        type=int,
        default=None,
        help="max_iter of both models (default: VeryDeepVAE's default, "
        f"{VeryDeepVAE().max_iter})",
    )
    parser.add_argument(
        "--n-train",
        type=int,
        default=N_TRAIN,
        help=f"training volumes (default {N_TRAIN})",
    )
    parser.add_argument(
        "--n-test",
        type=int,
        default=N_TEST,
        help=f"held-out volumes (default {N_TEST})",
    )
    parser.add_argument(
        "--n-show",
        type=int,
        default=N_SHOW,
        help=f"volumes per group in the figures (default {N_SHOW})",
    )
    parser.add_argument(
        "--n-check",
        type=int,
        default=32,
        help="volumes per group in the ellipsoid-fit check (default 32)",
    )
    parser.add_argument(
        "--baselines",
        nargs="+",
        choices=list(BASELINES),
        default=list(BASELINES),
        help="baselines to fit (default: all; 'VAE' is always fitted, its "
        "samples are the contrast)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) before anything runs (default: leave "
        "torch's default)",
    )
    parser.add_argument(
        "--out",
        default=DEFAULT_OUT,
        help=f"directory for the figures, arrays and JSON (default {DEFAULT_OUT})",
    )
    parser.add_argument(
        "--json", metavar="PATH", help="results JSON (default <out>/results.json)"
    )
    args = parser.parse_args(argv)
    for name in ("max_iter", "n_train", "n_test", "n_show", "n_check", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1")
    if "VAE" not in args.baselines:
        args.baselines = ["VAE", *args.baselines]
    if args.n_test < 2:
        parser.error("--n-test must be at least 2")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    json_path = args.json or str(out / "results.json")
    max_iter = args.max_iter if args.max_iter is not None else VeryDeepVAE().max_iter
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    info = machine_info(device)
    print_header(info, args, max_iter)
    start = time.perf_counter()
    watch = CPUWatch(info["cpus_usable"])
    results: dict = {
        "machine": info,
        "args": vars(args),
        "max_iter": max_iter,
        "max_iter_is_default": max_iter == VeryDeepVAE().max_iter,
        "vae_params": VAE_PARAMS,
        "seeds": [],
    }
    for seed in args.seeds:
        results["seeds"].append(run_seed(seed, args, out))
    results["summary"] = print_results(results)
    finish_run(results, start, watch, json_path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
