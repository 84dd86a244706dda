"""ContrastiveVAE against contrastive PCA: target-specific factors on new data.

Contrastive PCA (cPCA; Abid et al. 2018) takes the top eigenvectors of the
target covariance minus ``alpha`` times the background covariance; the
contrastive VAE (Abid & Zou 2019) is its nonlinear generalisation. This
script checks, on ``neurovae.datasets.make_contrastive`` data with known
factors, that ``neurovae.ContrastiveVAE``'s salient space

* predicts the target-only (salient) factors at least as well as cPCA when the
  mixing is nonlinear (``mixing="tanh"``),
* with no more leak of the shared factors (those both groups have),
* and gives the same ``transform`` whether new data come in one call or in
  several.

Data: ``make_contrastive(300, 300, 50, n_shared=2, n_salient=2,
n_clusters=3, mixing=..., random_state=0)``: 300 background and 300 target
samples of 50 features; both groups vary along 2 shared factors (sd 1), the
target group also along 2 salient factors (sd ``salient_std``, default 0.5)
that place it in 3 subgroups. Three settings by default: ``linear`` mixing,
``tanh`` mixing, and ``tanh`` with ``salient_std=1.0`` (``tanh-strong``:
stronger salient signal, more saturation). Each is split 50/50, stratified by
group (``train_test_split(test_size=0.5, stratify=y, random_state=0)``);
every method is fitted on the training half and judged on the held-out
half, so the embeddings are of data the models have not seen.

Methods, all of 2 salient dimensions unless said (every fit on the CPU,
``device="cpu"``):

1. **cPCA** (``alpha=1``): ``ContrastivePCA`` below; fitted on the target and
   background samples of the training half; ``transform(X) = (X - mean) @ V``
   with the *fitted* target mean ``mean`` and the top ``k = 2`` eigenvectors
   ``V`` of ``cov(target) - cov(background)``. Deterministic.
2. **cVAE salient**: ``ContrastiveVAE(n_components=2, n_salient_components=2,
   batch_size=32, max_iter=300, random_state=seed)``, fitted on the training
   half with its labels; ``transform`` (salient posterior means). The same
   fitted models also give **cVAE shared** (``transform_space="shared"``),
   which should hold the shared factors instead.
3. **VAE(4)**: ``neurovae.VAE(n_components=4, batch_size=32, max_iter=300,
   random_state=seed)`` on all training samples (both groups, no labels): the
   same total latent size without the contrastive structure.

Metrics, on the held-out *target* samples (150):

* ``R2 salient``: how well a linear read-out of the embedding predicts the
  salient factors (``info["salient_factors"]``): out-of-fold predictions of
  ``LinearRegression`` under 5-fold cross-validation (``KFold(5,
  shuffle=True, random_state=0)``), pooled, then ``r2_score`` averaged over
  the factors. Higher is better.
* ``R2 shared``: the same for the shared factors (``info["shared_factors"]``).
  For a salient space this is the *leak* (lower is better; about 0 or below
  when the embedding holds no linear trace of them); for the cVAE shared
  space and the VAE it is what they should hold. This is the *linear* leak.
* ``kNN salient``, ``kNN shared``: the same two figures with a nonlinear
  read-out, ``KNeighborsRegressor(10)`` on the standardised embedding (same
  folds). A linear read-out cannot see a factor that an embedding holds
  nonlinearly (e.g. leaked through the saturation of ``tanh``); this one can.
  Its "no information" floor is below 0 (about -0.1: the mean of 10
  unrelated values is a noisy guess); the ``truth`` row shows it.
* ``silhouette``: ``silhouette_score`` of the embedding with the target
  subgroups (``info["target_cluster"]``) as labels. The row ``truth`` gives
  the figures of the true salient factors themselves (the ceiling).

cVAE and VAE figures are mean +- sd over ``--seeds`` model seeds (the data and
the split stay fixed); per-seed values are printed too, so that a failed seed
is visible. Verdicts, per setting and for both read-outs: ``R2 salient:
cVAE - cPCA >= 0`` and ``leak: cVAE - cPCA <= 0.02`` (cross-validated R2
near 0 moves by a few hundredths from one seed to the next), both on the
means over seeds.

Batch consistency: for each fitted model, ``max |transform(X_test) -
vstack(transform(parts))|`` over all 300 held-out samples, for two ways of
splitting them: two calls (the first 100 samples, then the other 200) and
one call per sample. The ContrastiveVAE encodes each sample on its own, so
the figure must be 0 up to float32 rounding. So must the cPCA class here,
which subtracts the mean it stored at fit. Two other cPCA conventions are
shown for contrast, with the same eigenvectors:

* ``cPCA, re-centred``: ``(X - X.mean(0)) @ V``, centring on the data passed,
  which is what one does with implementations whose ``transform`` projects
  the data as given and expects them centred (e.g. the ``contrastive``
  package, Abid et al.'s reference code, centres and standardises the groups
  in ``fit`` but not in ``transform``; ``pcpca`` never centres);
* ``cPCA, sign of 1st row``: ``(X - mean) @ V`` with each column's sign
  flipped so that the first sample of the call is positive, as the
  ``contrastive`` package's ``CPCA.transform`` (``cpca_alpha``) does.

Both change with the other samples of the call. ``scale`` is the standard
deviation of the one-call embedding, to judge the discrepancies by.

Run ``python benchmarks/bench_contrastive.py --help`` for the options.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from sklearn.linear_model import LinearRegression
from sklearn.metrics import r2_score, silhouette_score
from sklearn.model_selection import KFold, cross_val_predict, train_test_split
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from neurovae import VAE, ContrastiveVAE
from neurovae.datasets import make_contrastive

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_engine import CPUWatch, finish_run, machine_info  # noqa: E402

SEED = 0  # data, split and cross-validation folds
N_BACKGROUND = N_TARGET = 300
N_FEATURES = 50
N_SHARED = N_SALIENT = 2
N_CLUSTERS = 3
BATCH_SIZE = 32
MAX_ITER = 300
N_FOLDS = 5
N_NEIGHBORS = 10  # the nonlinear read-out
FIRST_PART = 100  # the two-call split: samples [:100] and [100:]
LEAK_TOL = 0.02  # verdict: leak cVAE - cPCA <= LEAK_TOL
CONSISTENT_TOL = 1e-5  # discrepancy / scale below this: same result
# name -> extra make_contrastive arguments; the first two run by default
SETTINGS = {
    "linear": {"mixing": "linear"},
    "tanh": {"mixing": "tanh"},
    "tanh-strong": {"mixing": "tanh", "salient_std": 1.0},
}
QUICK_EPOCHS = 30


# ----------------------------------------------------------------------------
# contrastive PCA
# ----------------------------------------------------------------------------
class ContrastivePCA:
    """Contrastive PCA (Abid et al. 2018) with a fixed ``alpha``.

    ``fit`` stores the target mean and the top ``n_components`` eigenvectors
    of ``cov(target) - alpha * cov(background)`` (each group centred on its
    own mean, unbiased covariances); ``transform`` subtracts the stored mean
    and projects, so each sample's embedding depends on that sample only.
    """

    def __init__(self, n_components: int = 2, alpha: float = 1.0) -> None:
        self.n_components = n_components
        self.alpha = alpha

    def fit(self, X_target: np.ndarray, X_background: np.ndarray):
        self.mean_ = X_target.mean(axis=0)
        C_target = np.cov(X_target, rowvar=False)
        C_background = np.cov(X_background, rowvar=False)
        eigenvalues, vectors = np.linalg.eigh(C_target - self.alpha * C_background)
        top = np.argsort(eigenvalues)[::-1][: self.n_components]
        self.eigenvalues_ = eigenvalues[top]
        self.components_ = vectors[:, top]  # (n_features, n_components)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        return (X - self.mean_) @ self.components_

    # the two batch-dependent conventions shown for contrast
    def transform_recentred(self, X: np.ndarray) -> np.ndarray:
        """Centre on the data passed (``X.mean(0)``), not on the fitted mean."""
        return (X - X.mean(axis=0)) @ self.components_

    def transform_first_row_sign(self, X: np.ndarray) -> np.ndarray:
        """Flip each column so that the call's first sample is positive."""
        Z = self.transform(X)
        return Z * np.where(Z[0] < 0, -1.0, 1.0)


# ----------------------------------------------------------------------------
# data and metrics
# ----------------------------------------------------------------------------
def make_setting(name: str) -> dict:
    """Data of one setting, split 50/50 stratified by group."""
    X, y, info = make_contrastive(
        N_BACKGROUND,
        N_TARGET,
        N_FEATURES,
        n_shared=N_SHARED,
        n_salient=N_SALIENT,
        n_clusters=N_CLUSTERS,
        random_state=SEED,
        **SETTINGS[name],
    )
    train, test = train_test_split(
        np.arange(len(X)), test_size=0.5, stratify=y, random_state=SEED
    )
    test_target = test[y[test] != 0]
    return {
        "name": name,
        "params": SETTINGS[name],
        "X_train": X[train],
        "y_train": y[train],
        "X_test": X[test],
        "X_test_target": X[test_target],
        "salient": info["salient_factors"][test_target],
        "shared": info["shared_factors"][test_target],
        "cluster": info["target_cluster"][test_target],
    }


def probe_r2(E: np.ndarray, F: np.ndarray, *, knn: bool = False) -> list[float]:
    """Cross-validated R2 of each factor (column of ``F``) from the embedding
    ``E``: pooled out-of-fold predictions of a linear regression (or, with
    ``knn``, of a k-nearest-neighbours regression on the standardised
    embedding), scored factor by factor."""
    folds = KFold(N_FOLDS, shuffle=True, random_state=SEED)
    model = (
        make_pipeline(StandardScaler(), KNeighborsRegressor(N_NEIGHBORS))
        if knn
        else LinearRegression()
    )
    pred = cross_val_predict(model, E, F, cv=folds)
    return [float(v) for v in r2_score(F, pred, multioutput="raw_values")]


METRICS = ("r2_salient", "r2_shared", "knn_salient", "knn_shared", "silhouette")


def embedding_metrics(E: np.ndarray, data: dict) -> dict:
    """The metrics of one embedding of the held-out target samples; the R2
    figures are means over the factors (per factor under ``*_per_factor``)."""
    out = {}
    for prefix, knn in (("r2", False), ("knn", True)):
        for factors in ("salient", "shared"):
            each = probe_r2(E, data[factors], knn=knn)
            out[f"{prefix}_{factors}"] = float(np.mean(each))
            out[f"{prefix}_{factors}_per_factor"] = each
    out["silhouette"] = float(silhouette_score(E, data["cluster"]))
    return out


def batch_discrepancy(transform, X: np.ndarray) -> dict:
    """Largest difference between one call and the same samples in parts."""
    whole = np.asarray(transform(X), dtype=np.float64)
    two = np.vstack([transform(X[:FIRST_PART]), transform(X[FIRST_PART:])])
    single = np.vstack([transform(X[i : i + 1]) for i in range(len(X))])
    return {
        "two_calls": float(np.abs(whole - two).max()),
        "per_sample": float(np.abs(whole - single).max()),
        "scale": float(whole.std()),
    }


# ----------------------------------------------------------------------------
# one setting
# ----------------------------------------------------------------------------
def run_setting(
    name: str, seeds: list[int], max_iter: int, hidden: tuple[int, ...] = (256, 128)
) -> dict:
    data = make_setting(name)
    X_train, y_train, X_test = data["X_train"], data["y_train"], data["X_test"]
    X_eval = data["X_test_target"]
    print(
        f"[{name}] make_contrastive({SETTINGS[name]}): train {X_train.shape}, "
        f"test {X_test.shape} ({len(X_eval)} target); {len(seeds)} seed(s) x "
        f"(ContrastiveVAE + VAE), {max_iter} epochs ...",
        flush=True,
    )
    result = {"setting": name, "params": data["params"], "rows": {}, "seeds": []}

    truth = np.asarray(data["salient"])
    result["rows"]["truth"] = [embedding_metrics(truth, data)]

    tic = time.perf_counter()
    cpca = ContrastivePCA(N_SALIENT).fit(X_train[y_train != 0], X_train[y_train == 0])
    cpca_time = time.perf_counter() - tic
    result["rows"]["cPCA"] = [embedding_metrics(cpca.transform(X_eval), data)]
    result["cpca_fit_s"] = cpca_time
    result["cpca_eigenvalues"] = [float(v) for v in cpca.eigenvalues_]
    consistency = {
        "cPCA (fitted mean)": [batch_discrepancy(cpca.transform, X_test)],
        "cPCA, re-centred": [batch_discrepancy(cpca.transform_recentred, X_test)],
        "cPCA, sign of 1st row": [
            batch_discrepancy(cpca.transform_first_row_sign, X_test)
        ],
        "cVAE salient": [],
        "cVAE shared": [],
        "VAE(4)": [],
    }
    for key in ("cVAE salient", "cVAE shared", "VAE(4)"):
        result["rows"][key] = []

    train_args = {
        "batch_size": BATCH_SIZE,
        "max_iter": max_iter,
        "hidden_layer_sizes": hidden,
        "device": "cpu",
    }
    for seed in seeds:
        cvae = ContrastiveVAE(
            n_components=N_SHARED,
            n_salient_components=N_SALIENT,
            random_state=seed,
            **train_args,
        )
        tic = time.perf_counter()
        cvae.fit(X_train, y_train)
        cvae_time = time.perf_counter() - tic
        vae = VAE(n_components=N_SHARED + N_SALIENT, random_state=seed, **train_args)
        tic = time.perf_counter()
        vae.fit(X_train)
        vae_time = time.perf_counter() - tic

        cvae.set_params(transform_space="salient")
        result["rows"]["cVAE salient"].append(
            embedding_metrics(cvae.transform(X_eval), data)
        )
        consistency["cVAE salient"].append(batch_discrepancy(cvae.transform, X_test))
        cvae.set_params(transform_space="shared")
        result["rows"]["cVAE shared"].append(
            embedding_metrics(cvae.transform(X_eval), data)
        )
        consistency["cVAE shared"].append(batch_discrepancy(cvae.transform, X_test))
        result["rows"]["VAE(4)"].append(embedding_metrics(vae.transform(X_eval), data))
        consistency["VAE(4)"].append(batch_discrepancy(vae.transform, X_test))
        history = cvae.history_
        seed_info = {
            "seed": seed,
            "cvae_fit_s": cvae_time,
            "vae_fit_s": vae_time,
            "cvae_epochs": cvae.n_iter_,
            "vae_epochs": vae.n_iter_,
            "cvae_final": {
                key: float(history[key][-1])
                for key in ("loss", "recon", "kl", "tc", "discriminator")
                if key in history
            },
            "vae_final_loss": float(vae.history_["loss"][-1]),
        }
        result["seeds"].append(seed_info)
        s = result["rows"]["cVAE salient"][-1]
        print(
            f"  seed {seed}: cVAE {cvae_time:.1f} s, VAE {vae_time:.1f} s; cVAE "
            f"salient R2 {s['r2_salient']:.3f}, leak {s['r2_shared']:.3f}, "
            f"silhouette {s['silhouette']:.3f}",
            flush=True,
        )

    result["summary"] = {
        key: {metric: _mean_sd([r[metric] for r in rows]) for metric in METRICS}
        for key, rows in result["rows"].items()
    }
    result["consistency"] = {
        key: {
            "two_calls": max(r["two_calls"] for r in runs),
            "per_sample": max(r["per_sample"] for r in runs),
            "scale": statistics.mean(r["scale"] for r in runs),
            "runs": runs,
        }
        for key, runs in consistency.items()
    }
    cvae_s = result["summary"]["cVAE salient"]
    cpca_s = result["summary"]["cPCA"]
    diff = {m: cvae_s[m]["mean"] - cpca_s[m]["mean"] for m in METRICS}
    result["verdict"] = {
        "cvae_minus_cpca": diff,
        "salient_ok": {p: diff[f"{p}_salient"] >= 0 for p in ("r2", "knn")},
        "leak_ok": {p: diff[f"{p}_shared"] <= LEAK_TOL for p in ("r2", "knn")},
        "cvae_consistent": all(
            _consistent(result["consistency"][key])
            for key in ("cVAE salient", "cVAE shared")
        ),
    }
    return result


def _mean_sd(values: list[float]) -> dict:
    return {
        "mean": statistics.mean(values),
        "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
        "min": min(values),
        "max": max(values),
        "n": len(values),
    }


def _consistent(c: dict) -> bool:
    worst = max(c["two_calls"], c["per_sample"])
    return worst <= CONSISTENT_TOL * max(c["scale"], 1e-12)


# ----------------------------------------------------------------------------
# printing
# ----------------------------------------------------------------------------
def _cell(stat: dict) -> str:
    if stat["n"] == 1:
        return f"{stat['mean']:.3f}"
    return f"{stat['mean']:.3f}+-{stat['sd']:.3f}"


def print_setting(result: dict, n_seeds: int) -> None:
    print()
    print(
        f"Setting {result['setting']} ({result['params']}): held-out target "
        f"samples; cVAE/VAE: mean +- sd over {n_seeds} seed(s).\nR2: linear "
        f"read-out, kNN: {N_NEIGHBORS}-nearest-neighbours read-out "
        f"({N_FOLDS}-fold cross-validated); shared = leak for\ntruth, cPCA and "
        "cVAE salient (lower is better), the target for cVAE shared."
    )
    head = (
        f"{'embedding':<14}{'dims':>4}{'R2 salient':>14}{'R2 shared':>14}"
        f"{'kNN salient':>14}{'kNN shared':>14}{'silhouette':>14}"
    )
    print(head)
    print("-" * len(head))
    dims = {
        "truth": N_SALIENT,
        "cPCA": N_SALIENT,
        "cVAE salient": N_SALIENT,
        "cVAE shared": N_SHARED,
        "VAE(4)": N_SHARED + N_SALIENT,
    }
    for key, stats in result["summary"].items():
        cells = "".join(f"{_cell(stats[m]):>14}" for m in METRICS)
        print(f"{key:<14}{dims[key]:>4}{cells}")
    print("-" * len(head))
    print(
        "Per seed, cVAE salient (R2 salient / R2 shared / kNN salient / kNN "
        "shared / silhouette):"
    )
    for info, row in zip(result["seeds"], result["rows"]["cVAE salient"], strict=True):
        final = info["cvae_final"]
        disc = (
            f", discriminator loss {final['discriminator']:.3f}"
            if "discriminator" in final
            else ""
        )
        figures = " / ".join(f"{row[m]:.3f}" for m in METRICS)
        print(
            f"  seed {info['seed']}: {figures}; {info['cvae_epochs']} epochs, "
            f"fit {info['cvae_fit_s']:.1f} s (VAE {info['vae_fit_s']:.1f} s){disc}"
        )
    print(
        "Batch consistency on all 300 held-out samples: max |one call - parts| "
        f"(two calls:\n[:{FIRST_PART}] + [{FIRST_PART}:]; per sample: 300 calls; "
        "scale: sd of the one-call embedding)"
    )
    head = f"  {'transform':<24}{'two calls':>11}{'per sample':>12}{'scale':>8}  same"
    print(head)
    for key, c in result["consistency"].items():
        same = "yes" if _consistent(c) else "NO"
        print(
            f"  {key:<24}{c['two_calls']:>11.2g}{c['per_sample']:>12.2g}"
            f"{c['scale']:>8.3f}  {same}"
        )
    v = result["verdict"]
    d = v["cvae_minus_cpca"]
    print("cVAE salient - cPCA: " + ", ".join(f"{m} {d[m]:+.3f}" for m in METRICS))


def print_header(info: dict, args: argparse.Namespace) -> None:
    print("=" * 78)
    print("neurovae contrastive benchmark (benchmarks/bench_contrastive.py)")
    print("=" * 78)
    print(
        f"neurovae {info['neurovae']} (git {info['git']}) | torch {info['torch']} | "
        f"numpy {info['numpy']} | scikit-learn {info['scikit-learn']} | "
        f"Python {info['python']}"
    )
    print(f"platform: {info['platform']}")
    print(
        f"cpu: {info['cpu']} | cpu_count={info['cpu_count']} "
        f"usable={info['cpus_usable']} | torch threads={info['torch_threads']} "
        "| device=cpu"
    )
    if "loadavg_start" in info:
        print(f"load average at start (1, 5, 15 min): {info['loadavg_start']}")
    mode = "QUICK (smoke test; numbers not comparable)" if args.quick else "full"
    print(
        f"mode: {mode} | settings={args.settings} | seeds={args.seeds} | "
        f"epochs={args.epochs} | batch_size={BATCH_SIZE} | data/split seed={SEED}"
    )
    print()


# ----------------------------------------------------------------------------
# main
# ----------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=(
            "ContrastiveVAE vs contrastive PCA (and a plain VAE) on "
            "make_contrastive data: held-out R2 of the salient and shared "
            "factors, subgroup silhouette, and batch consistency of transform."
        )
    )
    parser.add_argument(
        "--settings",
        default=",".join(SETTINGS),
        help=f"data settings, comma-separated, from {', '.join(SETTINGS)} "
        "(default all)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        default=None,
        help="model seeds (random_state 0..N-1) per setting (default 3; 1 "
        "with --quick)",
    )
    parser.add_argument(
        "--epochs",
        type=int,
        default=None,
        help=f"max_iter of the ContrastiveVAE and the VAE (default {MAX_ITER}; "
        f"{QUICK_EPOCHS} with --quick)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help=f"smoke test: 1 seed, {QUICK_EPOCHS} epochs",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads(N) before anything runs (default: leave "
        "torch's default)",
    )
    parser.add_argument(
        "--hidden",
        default="64",
        help="hidden_layer_sizes of the ContrastiveVAE and the VAE, comma-separated "
        "(default 64: one layer suits 300 training samples of 50 features; the "
        "estimators' default 256,128 is sized for masked brain images)",
    )
    parser.add_argument("--json", metavar="PATH", help="write all results as JSON")
    args = parser.parse_args(argv)
    args.settings = [s.strip() for s in args.settings.split(",") if s.strip()]
    unknown = [s for s in args.settings if s not in SETTINGS]
    if not args.settings or unknown:
        parser.error(f"--settings takes {', '.join(SETTINGS)}; got {unknown}")
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    if args.epochs is None:
        args.epochs = QUICK_EPOCHS if args.quick else MAX_ITER
    for name in ("seeds", "epochs", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name} must be at least 1")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    info = machine_info(torch.device("cpu"))
    print_header(info, args)
    start = time.perf_counter()
    watch = CPUWatch(info["cpus_usable"])
    results: dict = {"machine": info, "args": vars(args), "settings": []}
    seeds = list(range(args.seeds))
    for name in args.settings:
        hidden = tuple(int(v) for v in args.hidden.split(","))
        result = run_setting(name, seeds, args.epochs, hidden)
        print_setting(result, len(seeds))
        print()
        results["settings"].append(result)

    print(
        "Verdicts: cVAE salient - cPCA, means over seeds (cPCA is deterministic)."
        "\nsalient: R2 of the salient factors (target: >= 0); leak: R2 of the "
        f"shared factors\n(target: <= {LEAK_TOL}); '!' marks a miss. consistent: "
        "the cVAE's transform gives the same\nresult in one call or several "
        "(both spaces)."
    )
    head = (
        f"  {'setting':<13}{'R2 salient':>12}{'R2 leak':>10}{'kNN salient':>13}"
        f"{'kNN leak':>10}{'silhouette':>12}  consistent"
    )
    print(head)
    for r in results["settings"]:
        v = r["verdict"]
        d = v["cvae_minus_cpca"]
        cells = ""
        for probe, width in (("r2", 12), ("knn", 13)):
            ok_s, ok_l = v["salient_ok"][probe], v["leak_ok"][probe]
            cells += f"{d[probe + '_salient']:>+{width - 1}.3f}{' ' if ok_s else '!'}"
            cells += f"{d[probe + '_shared']:>+9.3f}{' ' if ok_l else '!'}"
        print(
            f"  {r['setting']:<13}{cells}{d['silhouette']:>+12.3f}"
            f"  {'yes' if v['cvae_consistent'] else 'NO'}"
        )
    finish_run(results, start, watch, args.json)
    return 0


if __name__ == "__main__":
    sys.exit(main())
