"""Engine overhead and digits quality of ``neurovae.VAE``, side by side.

Two measurements, printed as small tables in one run:

1. **Speed** -- seconds per epoch of ``VAE.fit`` against a hand-written torch
   loop that trains the *identical* module on the same data:

   * the bare loop builds its module with the estimator's own
     ``_build_module`` under the seed that ``fit`` derives from
     ``random_state`` (``np.random.SeedSequence([random_state, 0])``, inside
     a forked torch RNG), so the initial weights are the very weights that
     ``fit`` starts from, and gives the module the noise generator ``fit``
     gives it (``module.generator``, seeded from the same sequence);
   * it shuffles with a ``torch.Generator`` seeded like ``fit``'s, by slicing
     a ``torch.randperm`` permutation; Adam with the estimator's learning
     rate; ``zero_grad(set_to_none=True)``, backward, step; and it accumulates
     ``loss.item()`` -- what a competent researcher writes by hand;
   * both runs therefore do exactly the same arithmetic: the script checks
     that the final weights and per-epoch losses of the two agree (on CPU
     they are bit-identical), which proves the comparison is like for like.

   Two settings: (a) scikit-learn digits (``data / 16``, 80 % train split)
   with the default MLP ``VAE(n_components=8)`` and its default batch size;
   (b) 64 smooth synthetic 32^3 volumes with ``backbone="conv"`` and
   ``batch_size=16``.

   Two per-epoch figures are reported for each side:

   * ``fit/N``: wall time of a whole run of N epochs divided by N. For the
     estimator this includes *everything* ``fit`` does: parameter and input
     validation, the float32 copy of X, the data statistics, building the
     module, the optimiser, the engine's per-epoch bookkeeping (history,
     snapshot of the weights). For the bare loop it includes building the
     module (the same ``_build_module`` call), the optimiser and the epochs;
     its float32 tensor is prepared beforehand and not timed.
   * ``epochs 2..N``: median time of epochs 2..N, i.e. without setup and
     without the first epoch -- ``history_["time"]`` for the estimator (the
     engine's own clock around each epoch; the end-of-epoch weight snapshot
     falls outside it) and the same clock in the bare loop.

   Runs are interleaved (estimator, loop, loop, estimator, ...) after one
   untimed warm-up of each, and medians over ``--repeats`` repetitions are
   reported. Ratios are estimator / bare loop: ``ratio`` divides the two
   medians; ``paired`` is the median over repeats of the ratio of an estimator
   run and the bare run next to it in time; ``min`` divides the fastest
   repeats. ``paired`` is the one held to the target (<= 1.05, DESIGN.md
   section 6): two runs adjacent in time share the machine's state, whereas
   the ratio of medians swings by tens of percent when the machine changes
   speed during the run (seen on a small cloud VM whose epochs flip between
   about 32 and 51 ms with no other process running).

2. **Quality** on digits at 8 components, same split: held-out reconstruction
   MSE and linear-probe accuracy (``LogisticRegression(max_iter=5000)`` on the
   latent means, trained on the train split, scored on the test split) of the
   default ``VAE(n_components=8)`` (several seeds) and of ``PCA(8)``.
   Targets: VAE MSE <= 0.016 and probe >= 0.93 (PCA(8): 0.0253 and 0.889).

Torch keeps its default thread settings; the count is printed. Run
``python benchmarks/bench_engine.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import io
import json
import math
import os
import platform
import pstats
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import scipy
import sklearn
import torch
from scipy.ndimage import gaussian_filter
from sklearn.datasets import load_digits
from sklearn.decomposition import PCA
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import train_test_split

import neurovae
from neurovae import VAE

try:
    import resource
except ImportError:  # not on Windows
    resource = None

SEED = 0  # random_state of every timed fit, the data and the split
SPEED_TARGET = 1.05
MSE_TARGET = 0.016
PROBE_TARGET = 0.93
N_COMPONENTS = 8
# conv setting: (n_volumes, size of the cube, batch_size, epochs)
CONV_FULL = (64, 32, 16, 3)
CONV_QUICK = (16, 16, 8, 2)
BUSY_THRESHOLD = 0.10  # warn when other processes used more of the CPUs


# ----------------------------------------------------------------------------
# machine and versions
# ----------------------------------------------------------------------------
def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _git_revision() -> str:
    root = Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "neurovae"],
            cwd=root,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return rev + (" (neurovae/ modified)" if dirty else "")


def usable_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def machine_info(device: torch.device) -> dict:
    n_usable = usable_cpus()
    info = {
        "python": platform.python_version(),
        "neurovae": neurovae.__version__,
        "git": _git_revision(),
        "torch": torch.__version__,
        "numpy": np.__version__,
        "scipy": scipy.__version__,
        "scikit-learn": sklearn.__version__,
        "platform": platform.platform(),
        "cpu": _cpu_model(),
        "cpu_count": os.cpu_count(),
        "cpus_usable": n_usable,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    if hasattr(os, "getloadavg"):
        info["loadavg_start"] = [round(v, 2) for v in os.getloadavg()]
    return info


class CPUWatch:
    """Share of the CPUs that *other* processes used since construction.

    Busy time of the whole machine (``/proc/stat``) minus this process's own
    CPU time (``getrusage``), over wall time x usable CPUs. Linux only; None
    elsewhere. A few percent is normal; much more means timings are disturbed.
    """

    def __init__(self, n_cpus: int | None) -> None:
        self.n_cpus = n_cpus or 1
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[float, float, float] | None:
        if resource is None:
            return None
        try:
            with open("/proc/stat") as f:
                ticks = [int(v) for v in f.readline().split()[1:9]]
            hz = os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError):
            return None
        busy = (sum(ticks) - ticks[3] - ticks[4]) / hz  # minus idle and iowait
        own = sum(
            getattr(resource.getrusage(who), field)
            for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN)
            for field in ("ru_utime", "ru_stime")
        )
        return time.perf_counter(), busy, own

    def foreign_share(self) -> float | None:
        end = self._read()
        if self.start is None or end is None:
            return None
        wall = end[0] - self.start[0]
        foreign = (end[1] - self.start[1]) - (end[2] - self.start[2])
        return max(0.0, foreign / (wall * self.n_cpus)) if wall > 0 else None


def _busy_note(share: float | None) -> str:
    if share is None:
        return ""
    note = f"other processes used {100 * share:.0f} % of the CPUs"
    if share > BUSY_THRESHOLD:
        note += " -- WARNING: timings disturbed, re-run on a quiet machine"
    return note


def print_header(info: dict, args: argparse.Namespace) -> None:
    print("=" * 78)
    print("neurovae engine benchmark (benchmarks/bench_engine.py)")
    print("=" * 78)
    print(
        f"neurovae {info['neurovae']} (git {info['git']}) | torch {info['torch']} | "
        f"numpy {info['numpy']} | scipy {info['scipy']} | "
        f"scikit-learn {info['scikit-learn']} | Python {info['python']}"
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
    mode = (
        "QUICK (smoke test; numbers not comparable to targets)"
        if args.quick
        else "full"
    )
    print(f"mode: {mode} | repeats={args.repeats} | seed={SEED}")
    print()


# ----------------------------------------------------------------------------
# data
# ----------------------------------------------------------------------------
def digits_split():
    digits = load_digits()
    X = digits.data / 16.0
    return train_test_split(X, digits.target, test_size=0.2, random_state=SEED)


def smooth_volumes(
    rng: np.random.Generator, n: int, size: int, dtype=np.float64
) -> np.ndarray:
    """``n`` smooth random volumes of ``size``^3 (blurred noise, unit std),
    float32; the noise is drawn and blurred in ``dtype``."""
    noise = rng.standard_normal((n, size, size, size), dtype=dtype)
    vols = gaussian_filter(noise, sigma=(0, 2.5, 2.5, 2.5))
    vols /= vols.std()
    return vols.astype(np.float32, copy=False)


# ----------------------------------------------------------------------------
# the two contestants
# ----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def fit_seeds(random_state: int) -> tuple[int, int, int]:
    """The (init, shuffle, noise) seeds that ``VAE.fit`` derives from random_state."""
    seeds = np.random.SeedSequence([random_state, 0]).generate_state(3)
    return tuple(int(s) for s in seeds)


def run_estimator(
    params: dict, X: np.ndarray, n_epochs: int, device: torch.device
) -> dict:
    """Time ``VAE(**params).fit(X)`` for ``n_epochs`` epochs."""
    est = VAE(**params, max_iter=n_epochs, random_state=SEED, device=str(device))
    _sync(device)
    tic = time.perf_counter()
    est.fit(X)
    _sync(device)
    total = time.perf_counter() - tic
    return {
        "total": total,
        "epoch_times": [float(t) for t in est.history_["time"]],
        "losses": [float(v) for v in est.history_["loss"]],
        "module": est.module_,
    }


def likelihood_init(template: VAE, X_raw: np.ndarray) -> dict:
    """The data statistics ``fit`` builds the module from (raw data)."""
    return template._likelihood_init(template._statistics(np.asarray(X_raw)))


def run_bare_loop(
    template: VAE,
    init: dict,
    X: torch.Tensor,
    n_epochs: int,
    batch_size: int,
    lr: float,
    device: torch.device,
) -> dict:
    """A hand-written torch loop on the module ``template.fit`` would build.

    ``template`` is a fitted estimator with the same parameters; only its
    ``_build_module`` is used, with the data statistics ``init`` that ``fit``
    passes it and under the seed ``fit`` uses, so the module and its initial
    weights are identical. ``X`` is the (scaled) tensor ``fit`` trains on.
    The reparameterisation noise comes from the module's own generator,
    seeded as ``fit`` seeds it.
    """
    init_seed, shuffle_seed, noise_seed = fit_seeds(SEED)
    X = X.to(device)
    n = X.shape[0]
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        _sync(device)
        tic = time.perf_counter()
        torch.manual_seed(init_seed)
        module = template._build_module(template._sample_shape, init).to(device)
        module.generator = torch.Generator(device=device).manual_seed(noise_seed)
        optimizer = torch.optim.Adam(module.parameters(), lr=lr)
        generator = torch.Generator().manual_seed(shuffle_seed)
        module.train()
        epoch_times, losses = [], []
        for _ in range(n_epochs):
            t_epoch = time.perf_counter()
            perm = torch.randperm(n, generator=generator).to(device)
            running = 0.0
            for start in range(0, n, batch_size):
                xb = X[perm[start : start + batch_size]]
                optimizer.zero_grad(set_to_none=True)
                loss = module((xb,))["loss"]
                loss.backward()
                optimizer.step()
                running += loss.item() * xb.shape[0]
            losses.append(running / n)
            epoch_times.append(time.perf_counter() - t_epoch)
        _sync(device)
        total = time.perf_counter() - tic
    return {
        "total": total,
        "epoch_times": epoch_times,
        "losses": losses,
        "module": module,
    }


def max_state_diff(a: dict, b: dict) -> float:
    """Largest absolute difference between two state dicts (inf if unlike)."""
    if a.keys() != b.keys():
        return float("inf")
    return max(float((a[k].float().cpu() - b[k].float().cpu()).abs().max()) for k in a)


# ----------------------------------------------------------------------------
# speed
# ----------------------------------------------------------------------------
def bench_setting(
    name: str,
    params: dict,
    X: np.ndarray,
    batch_size: int,
    n_epochs: int,
    repeats: int,
    device: torch.device,
) -> dict:
    """Interleaved, repeated timing of the estimator and the bare loop."""
    print(
        f"[speed] {name}: X {X.shape}, batch {batch_size}, {n_epochs} epochs x "
        f"{repeats} repeats ...",
        flush=True,
    )
    lr = VAE(**params).learning_rate_init
    # untimed warm-up of both; the estimator's run is also the template
    template = VAE(**params, max_iter=1, random_state=SEED, device=str(device))
    template.fit(X)
    X32 = template._to_tensor(np.asarray(X))  # the tensor fit trains on
    init = likelihood_init(template, X)
    run_bare_loop(template, init, X32, 1, batch_size, lr, device)

    watch = CPUWatch(usable_cpus())
    est_runs, bare_runs = [], []
    for rep in range(repeats):
        order = ("est", "bare") if rep % 2 == 0 else ("bare", "est")
        for who in order:
            gc.collect()  # not timed, not in the profiles
            if who == "est":
                est_runs.append(run_estimator(params, X, n_epochs, device))
            else:
                bare_runs.append(
                    run_bare_loop(template, init, X32, n_epochs, batch_size, lr, device)
                )

    foreign = watch.foreign_share()
    # like-for-like check: same arithmetic -> same weights and losses
    dw = max_state_diff(
        est_runs[-1]["module"].state_dict(), bare_runs[-1]["module"].state_dict()
    )
    dloss = max(
        abs(a - b)
        for a, b in zip(est_runs[-1]["losses"], bare_runs[-1]["losses"], strict=True)
    )

    def per_epoch_total(runs, reduce=statistics.median):
        return reduce(r["total"] / n_epochs for r in runs)

    def per_epoch_steady(runs, reduce=statistics.median):
        if n_epochs < 2:
            return float("nan")
        return reduce(statistics.median(r["epoch_times"][1:]) for r in runs)

    def outside_epochs(runs):
        return statistics.median(r["total"] - sum(r["epoch_times"]) for r in runs)

    result = {
        "setting": name,
        "shape": list(X.shape),
        "batch_size": batch_size,
        "steps_per_epoch": -(-X.shape[0] // batch_size),
        "epochs": n_epochs,
        "repeats": repeats,
        "max_abs_weight_diff": dw,
        "max_abs_loss_diff": dloss,
        "foreign_cpu_share": foreign,
        "estimator_outside_epochs": outside_epochs(est_runs),
        "bare_outside_epochs": outside_epochs(bare_runs),
    }
    for key, measure in (("total", per_epoch_total), ("steady", per_epoch_steady)):
        for stat, reduce in (("", statistics.median), ("_min", min)):
            est = result[f"estimator_{key}_per_epoch{stat}"] = measure(est_runs, reduce)
            bare = result[f"bare_{key}_per_epoch{stat}"] = measure(bare_runs, reduce)
            result[f"ratio_{key}{stat}"] = est / bare
    # paired: each estimator run against the bare run next to it in time
    for key, per_run in (
        ("total", lambda r: r["total"]),
        ("steady", lambda r: statistics.median(r["epoch_times"][1:] or [math.nan])),
    ):
        result[f"ratio_{key}_paired"] = statistics.median(
            per_run(e) / per_run(b) for e, b in zip(est_runs, bare_runs, strict=True)
        )
    result["raw"] = {
        who: [{"total": r["total"], "epoch_times": r["epoch_times"]} for r in runs]
        for who, runs in (("estimator", est_runs), ("bare", bare_runs))
    }
    return result


def print_speed_table(results: list[dict]) -> None:
    print()
    print(
        "Speed: seconds per epoch, median of repeats. ratio: of those medians; "
        "paired: median\nratio of an estimator run and the bare run next to it "
        "in time; min: ratio of the\nfastest repeats. Target: paired ratio <= "
        f"{SPEED_TARGET:.2f}."
    )
    head = (
        f"{'setting':<22}{'measure':<13}{'VAE.fit':>9}{'bare loop':>11}"
        f"{'ratio':>8}{'paired':>8}{'min':>8}  {'ok':<3}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        for label, key in (("fit/N", "total"), ("epochs 2..N", "steady")):
            if math.isnan(r[f"ratio_{key}"]):  # a single epoch: no epochs 2..N
                print(f"{'':<22}{label:<13}{'n/a (needs --epochs >= 2)':>38}")
                continue
            est = r[f"estimator_{key}_per_epoch"]
            bare = r[f"bare_{key}_per_epoch"]
            ratio = r[f"ratio_{key}"]
            paired = r[f"ratio_{key}_paired"]
            ok = "yes" if paired <= SPEED_TARGET else "NO"
            setting = r["setting"] if key == "total" else ""
            print(
                f"{setting:<22}{label:<13}{est:>9.4f}{bare:>11.4f}"
                f"{ratio:>8.3f}{paired:>8.3f}{r[f'ratio_{key}_min']:>8.3f}  {ok:<3}"
            )
    print("-" * len(head))
    for r in results:
        same = r["max_abs_weight_diff"] == 0.0 and r["max_abs_loss_diff"] == 0.0
        print(
            f"{r['setting']}: {r['steps_per_epoch']} steps/epoch, "
            f"{r['epochs']} epochs x {r['repeats']} repeats; time outside the "
            f"epochs per fit: VAE.fit {1e3 * r['estimator_outside_epochs']:.1f} ms, "
            f"bare {1e3 * r['bare_outside_epochs']:.1f} ms; same computation: "
            f"max|dw|={r['max_abs_weight_diff']:.2g}, "
            f"max|dloss|={r['max_abs_loss_diff']:.2g}"
            + (" (identical)" if same else "")
        )
        if r["foreign_cpu_share"] is not None:
            print(f"  during these timings {_busy_note(r['foreign_cpu_share'])}")


# ----------------------------------------------------------------------------
# quality
# ----------------------------------------------------------------------------
def reconstruction_mse(model, X: np.ndarray) -> float:
    return float(np.mean((model.inverse_transform(model.transform(X)) - X) ** 2))


def probe_accuracy(model, X_train, y_train, X_test, y_test) -> float:
    probe = LogisticRegression(max_iter=5000)
    probe.fit(model.transform(X_train), y_train)
    return float(probe.score(model.transform(X_test), y_test))


def bench_quality(seeds: list[int], max_iter: int | None, device: torch.device) -> dict:
    X_train, X_test, y_train, y_test = digits_split()
    print(
        f"[quality] digits: VAE(n_components={N_COMPONENTS}) x {len(seeds)} "
        "seed(s) and PCA ...",
        flush=True,
    )
    rows = []
    for seed in seeds:
        kwargs = {} if max_iter is None else {"max_iter": max_iter}
        vae = VAE(
            n_components=N_COMPONENTS, random_state=seed, device=str(device), **kwargs
        )
        tic = time.perf_counter()
        vae.fit(X_train)
        fit_time = time.perf_counter() - tic
        rows.append(
            {
                "seed": seed,
                "epochs": vae.n_iter_,
                "fit_time": fit_time,
                "mse": reconstruction_mse(vae, X_test),
                "probe": probe_accuracy(vae, X_train, y_train, X_test, y_test),
            }
        )
    pca = PCA(N_COMPONENTS, random_state=SEED)
    tic = time.perf_counter()
    pca.fit(X_train)
    pca_time = time.perf_counter() - tic
    pca_row = {
        "fit_time": pca_time,
        "mse": reconstruction_mse(pca, X_test),
        "probe": probe_accuracy(pca, X_train, y_train, X_test, y_test),
    }
    mean = {
        key: float(np.mean([r[key] for r in rows]))
        for key in ("fit_time", "mse", "probe")
    }
    return {"vae": rows, "vae_mean": mean, "pca": pca_row}


def print_quality_table(q: dict, quick: bool) -> None:
    print()
    note = " [quick mode: few epochs, not comparable]" if quick else ""
    print(
        f"Quality: digits, {N_COMPONENTS} components, held-out 20 % "
        f"(targets: VAE MSE <= {MSE_TARGET}, probe >= {PROBE_TARGET}){note}"
    )
    head = f"{'model':<22}{'epochs':>7}{'fit s':>9}{'test MSE':>11}{'probe acc':>11}"
    print(head)
    print("-" * len(head))
    for r in q["vae"]:
        print(
            f"{'VAE seed ' + str(r['seed']):<22}{r['epochs']:>7}"
            f"{r['fit_time']:>9.2f}{r['mse']:>11.4f}{r['probe']:>11.3f}"
        )
    m = q["vae_mean"]
    mse_ok = "ok" if m["mse"] <= MSE_TARGET else "MISS"
    probe_ok = "ok" if m["probe"] >= PROBE_TARGET else "MISS"
    print(
        f"{'VAE mean':<22}{'':>7}{m['fit_time']:>9.2f}{m['mse']:>11.4f}"
        f"{m['probe']:>11.3f}   MSE {mse_ok}, probe {probe_ok}"
    )
    p = q["pca"]
    print(
        f"{'PCA(8)':<22}{'':>7}{p['fit_time']:>9.2f}{p['mse']:>11.4f}"
        f"{p['probe']:>11.3f}"
    )


# ----------------------------------------------------------------------------
# optional profile of the estimator's epochs
# ----------------------------------------------------------------------------
def profile_digits(n_epochs: int, device: torch.device) -> str:
    """cProfile of ``VAE.fit`` on digits next to the bare loop, top functions."""
    X_train = digits_split()[0]
    params = {"n_components": N_COMPONENTS}
    template = VAE(**params, max_iter=1, random_state=SEED, device=str(device))
    template.fit(X_train)
    X32 = template._to_tensor(X_train)
    init = likelihood_init(template, X_train)
    out = io.StringIO()
    for label, call in (
        ("VAE.fit", lambda: run_estimator(params, X_train, n_epochs, device)),
        (
            "bare loop",
            lambda: run_bare_loop(
                template, init, X32, n_epochs, 200, template.learning_rate_init, device
            ),
        ),
    ):
        profiler = cProfile.Profile()
        profiler.enable()
        call()
        profiler.disable()
        out.write(f"\n--- cProfile: {label}, digits, {n_epochs} epochs ---\n")
        stats = pstats.Stats(profiler, stream=out).sort_stats("tottime")
        stats.print_stats(15)
    return out.getvalue()


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "Time VAE.fit against a hand-written torch loop on the identical "
            "module (digits MLP and 32^3 conv), and compare the default VAE "
            "with PCA on digits."
        )
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed repetitions of each contestant (default 7; 2 with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help="epochs per timed run, both settings (default 20 for digits and 3 "
        "for the conv volumes; 2 with --quick)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="VAE seeds of the quality table (default 3; 1 with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="smoke test in a few seconds: tiny volumes, few epochs, "
        "a 5-epoch quality run",
    )
    parser.add_argument(
        "--skip-speed", action="store_true", help="only the quality table"
    )
    parser.add_argument(
        "--skip-quality", action="store_true", help="only the speed table"
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="also print a cProfile of VAE.fit and of the bare loop on digits",
    )
    parser.add_argument(
        "--device",
        default="cpu",
        help="device of the speed runs (default cpu; 'cuda' is untested here)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) before anything runs (default: leave "
        "torch's default)",
    )
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    args = parser.parse_args(argv)
    if args.repeats is None:
        args.repeats = 2 if args.quick else 7
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    for name in ("repeats", "seeds"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1")
    for name in ("epochs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def json_safe(value):
    """NaN and infinities as null, dict keys as strings: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def finish_run(results: dict, start: float, watch: CPUWatch, json_path) -> None:
    """Print the run's total time and the CPU share of other processes, and
    write ``results`` as JSON to ``json_path`` (when given)."""
    elapsed = time.perf_counter() - start
    foreign = watch.foreign_share()
    results["elapsed_s"] = elapsed
    results["machine"]["foreign_cpu_share"] = foreign
    if hasattr(os, "getloadavg"):
        results["machine"]["loadavg_end"] = [round(v, 2) for v in os.getloadavg()]
    print()
    line = f"total benchmark time: {elapsed:.1f} s"
    if foreign is not None:
        line += f"; over the whole run {_busy_note(foreign)}"
    print(line)
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps(json_safe(results), indent=2, default=str)
        path.write_text(text + "\n")
        print(f"results written to {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    device = torch.device(args.device)
    info = machine_info(device)
    print_header(info, args)
    start = time.perf_counter()
    watch = CPUWatch(info["cpus_usable"])
    results: dict = {"machine": info, "args": vars(args)}

    if not args.skip_speed:
        X_train = digits_split()[0]
        n_vols, size, conv_batch, conv_epochs = CONV_QUICK if args.quick else CONV_FULL
        digits_epochs = 2 if args.quick else 20
        if args.epochs is not None:
            conv_epochs = digits_epochs = args.epochs
        vols = smooth_volumes(np.random.default_rng(SEED), n_vols, size)
        conv_params = {
            "n_components": N_COMPONENTS,
            "backbone": "conv",
            "batch_size": conv_batch,
        }
        speed = [
            bench_setting(
                "digits MLP",
                {"n_components": N_COMPONENTS},
                X_train,
                min(200, X_train.shape[0]),  # batch_size="auto"
                digits_epochs,
                args.repeats,
                device,
            ),
            bench_setting(
                f"conv {n_vols}x{size}^3",
                conv_params,
                vols,
                conv_batch,
                conv_epochs,
                args.repeats,
                device,
            ),
        ]
        print_speed_table(speed)
        results["speed"] = speed

    if not args.skip_quality:
        quality = bench_quality(
            list(range(args.seeds)), max_iter=5 if args.quick else None, device=device
        )
        print_quality_table(quality, args.quick)
        results["quality"] = quality

    if args.profile:
        report = profile_digits(2 if args.quick else 20, device)
        print(report)
        results["profile"] = report

    finish_run(results, start, watch, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
