"""Command line interface: ``neurovae demo`` (also ``python -m neurovae``).

``demo`` is the quick start's main job: it fits a VAE on scikit-learn's
digits (bundled with scikit-learn, no download), and prints what it learned
next to PCA with the same number of components.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence


def _demo(args: argparse.Namespace) -> int:
    import numpy as np
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    from neurovae import VAE

    digits = load_digits()
    X = digits.data / 16.0
    X_train, X_test, y_train, y_test = train_test_split(
        X, digits.target, test_size=0.2, random_state=0
    )
    k = args.n_components
    print(
        f"neurovae demo: digits, {X_train.shape[0]} train / {X_test.shape[0]} "
        f"test images of {X.shape[1]} pixels, {k} latent components"
    )
    vae = VAE(n_components=k, random_state=args.random_state, verbose=args.verbose)
    if args.max_iter is not None:
        vae.set_params(max_iter=args.max_iter)
    tic = time.perf_counter()
    vae.fit(X_train)
    fit_time = time.perf_counter() - tic
    pca = PCA(n_components=k).fit(X_train)

    def probe(model) -> float:
        clf = LogisticRegression(max_iter=5000)
        clf.fit(model.transform(X_train), y_train)
        return clf.score(model.transform(X_test), y_test)

    def mse(model) -> float:
        recon = model.inverse_transform(model.transform(X_test))
        return float(np.mean((recon - X_test) ** 2))

    loss = vae.history_["loss"]
    print(
        f"VAE fit: {vae.n_iter_} epochs in {fit_time:.1f} s on "
        f"{vae._module_device()}; loss {loss[0]:.1f} -> {loss[-1]:.1f} nats, "
        f"final KL {vae.history_['kl'][-1]:.1f} nats"
    )
    print(f"held-out ELBO per image: {vae.score(X_test):.1f} nats")
    print(f"{'':24}{'VAE':>8}{'PCA':>8}")
    print(f"{'held-out MSE':24}{mse(vae):8.4f}{mse(pca):8.4f}")
    print(f"{'linear-probe accuracy':24}{probe(vae):8.3f}{probe(pca):8.3f}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    """The ``neurovae`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="neurovae",
        description="Variational autoencoders for neuroimaging.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    demo = sub.add_parser(
        "demo",
        help="fit a VAE on scikit-learn's digits and compare it with PCA",
        description="Fit a VAE on scikit-learn's digits (no download needed) "
        "and print held-out reconstruction error and linear-probe accuracy "
        "next to PCA.",
    )
    demo.add_argument("--n-components", type=int, default=8)
    demo.add_argument(
        "--max-iter", type=int, default=None, help="epochs (default: VAE's default)"
    )
    demo.add_argument("--random-state", type=int, default=0)
    demo.add_argument("--verbose", type=int, default=0, choices=(0, 1, 2))
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurovae`` command.

    Examples
    --------
    >>> main(["demo", "--max-iter", "2"])  # doctest: +ELLIPSIS
    neurovae demo: digits, 1437 train / 360 test images of 64 pixels, ...
    0
    """
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    for name in ("n_components", "max_iter"):
        value = getattr(args, name, None)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args.func(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
