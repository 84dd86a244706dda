"""Command line interface: ``neurovae`` (also ``python -m neurovae``).

Commands
--------
``neurovae demo``
    The quick start's main job: fits a VAE on scikit-learn's digits (bundled
    with scikit-learn, no download) and prints what it learned next to PCA
    with the same number of components.
``neurovae fit CONFIG DATA... -o OUTDIR``
    Trains an estimator described by a JSON configuration on NIfTI files and
    writes the model (safe format), its history, a loss curve,
    reconstructions and samples to ``OUTDIR``. Under ``torchrun`` only rank 0
    writes files.
``neurovae sample MODEL -n N -o OUT``
    Draws images from a saved model: one 3-D file per sample in the folder
    ``OUT``, or one 4-D file when ``OUT`` ends in ``.nii`` / ``.nii.gz``.
``neurovae transform MODEL DATA... -o latents.csv``
    Latent codes of images as CSV (``-o -``, the default, for stdout).

``DATA`` is one or more glob patterns or file paths (quote patterns so that
neurovae expands them; a shell's expansion works as well): the matches of
each pattern are sorted, in the order the patterns are given. The files are
3-D images, one sample each, or a single 4-D image (samples along the 4th
axis).

The configuration of ``fit`` is a JSON object::

    {
      "estimator": "VAE",
      "params": {"n_components": 8, "hidden_layer_sizes": [256, 64],
                 "max_iter": 100, "random_state": 0},
      "n_reconstructions": 4,
      "n_samples": 4
    }

``estimator`` (required) names a neurovae estimator; ``params`` (default
``{}``) are its parameters (JSON lists stand for tuples, ``null`` for None);
``n_reconstructions`` and ``n_samples`` (default 4 each, 0 for none) say how
many reconstructions of the first inputs and how many samples ``fit``
writes. Relative paths among the parameters (``mask_img``, and
``VeryDeepVAE``'s ``config``) are relative to the configuration file's
folder. ``--set KEY=VALUE`` overrides a parameter (the value is read as JSON,
else as a string). ``ContrastiveVAE`` takes its labels from ``--labels``.

User errors (missing files, bad configurations, patterns that match nothing,
files that are not neurovae models, data the estimator refuses) print one
line starting with ``neurovae: error:`` on stderr and exit with status 2.
"""

from __future__ import annotations

import argparse
import csv
import difflib
import glob
import inspect
import json
import math
import os
import sys
import time
from collections.abc import Sequence

_CONFIG_KEYS = ("estimator", "params", "n_reconstructions", "n_samples")
_DEFAULT_N_OUTPUTS = 4
# parameters holding paths, resolved against the configuration file's folder
_PATH_PARAMS = ("mask_img", "config")
_NIFTI_SUFFIXES = (".nii.gz", ".nii")


class UserError(Exception):
    """An error in what the user gave: reported in one line, exit status 2."""


def _one_line(message: str) -> str:
    return " ".join(str(message).split())


# ----------------------------------------------------------------------
# demo
# ----------------------------------------------------------------------
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


# ----------------------------------------------------------------------
# shared pieces: data, models, outputs
# ----------------------------------------------------------------------
def _estimators() -> dict[str, type]:
    """The estimator classes a configuration may name."""
    import neurovae
    from neurovae.base import BaseVAE

    classes = {name: getattr(neurovae, name) for name in neurovae.__all__}
    return {
        name: cls
        for name, cls in classes.items()
        if isinstance(cls, type)
        and issubclass(cls, BaseVAE)
        # its inputs are runs and its outputs lists of runs: not (yet) the
        # CLI's one-volume-per-file layout
        and name != "RecurrentVAE"
    }


def _expand(patterns: Sequence[str]) -> list[str]:
    """The files named by glob patterns or paths, each pattern's sorted."""
    files: list[str] = []
    for pattern in patterns:
        if glob.has_magic(pattern):
            matches = sorted(glob.glob(pattern, recursive=True))
            if not matches:
                raise UserError(f"no file matches {pattern!r}")
        elif os.path.exists(pattern):
            matches = [pattern]
        else:
            raise UserError(f"{pattern!r} does not exist")
        for path in matches:
            if not os.path.isfile(path):
                raise UserError(f"{path!r} is not a file")
        files.extend(matches)
    return files


def _n_dims(path: str) -> int:
    """Number of axes of the image in ``path`` (a trailing 1 not counted)."""
    import nibabel as nib

    try:
        shape = nib.load(path).shape
    except Exception as exc:  # nibabel raises several types for bad files
        raise UserError(f"cannot read {path!r} as a NIfTI image ({exc})") from exc
    return 4 if len(shape) == 4 and shape[3] > 1 else len(shape)


def _niimgs(files: list[str]):
    """What the estimators take for ``files``: a single 4-D file as itself
    (its volumes are the samples), anything else as a list of 3-D files."""
    if len(files) == 1 and _n_dims(files[0]) == 4:
        return files[0]
    return files


def _stem(path: str) -> str:
    name = os.path.basename(path)
    for suffix in _NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return name


def _rank() -> int:
    """This process's rank under ``torchrun`` (0 outside it)."""
    try:
        return int(os.environ.get("RANK", 0))
    except ValueError:
        return 0


def _load_model(path: str):
    """A neurovae model from a safe-format file, fitted on images."""
    from neurovae import load

    try:
        model = load(path)
    except FileNotFoundError:
        raise UserError(f"model file {path!r} does not exist") from None
    except OSError as exc:
        raise UserError(f"cannot read model file {path!r}: {exc.strerror}") from None
    except ValueError as exc:
        # torch.load failed: not a torch file of plain values at all (its
        # message would suggest weights_only=False, which is not for strangers)
        if "is not a readable neurovae model" in str(exc):
            raise UserError(
                f"{path!r} is not a neurovae model file (the safe format "
                "written by `neurovae fit` or estimator.save)"
            ) from None
        raise UserError(_one_line(exc)) from None
    if getattr(model, "affine_", None) is None:
        raise UserError(
            f"{path!r} holds a {type(model).__name__} fitted on arrays, not "
            "on images; the command line reads and writes NIfTI images only"
        )
    return model


def _split_volumes(img, paths: Sequence[str]) -> None:
    """Save the volumes of the 4-D ``img`` as 3-D images, one per path."""
    import nibabel as nib

    for i, path in enumerate(paths):
        nib.save(img.slicer[..., i], path)


def _volume_names(n: int, prefix: str) -> list[str]:
    width = max(4, len(str(n - 1)))
    return [f"{prefix}{i:0{width}d}.nii.gz" for i in range(n)]


# ----------------------------------------------------------------------
# fit
# ----------------------------------------------------------------------
def _read_config(path: str) -> dict:
    """The configuration file, checked (types of its own keys, not params)."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except FileNotFoundError:
        raise UserError(f"configuration file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"cannot read configuration file {path!r}: {exc}") from None
    try:
        config = json.loads(text)
    except json.JSONDecodeError as exc:
        raise UserError(
            f"{path}: invalid JSON at line {exc.lineno}, column {exc.colno}: {exc.msg}"
        ) from None
    if not isinstance(config, dict):
        raise UserError(f"{path}: the configuration must be a JSON object")
    unknown = [k for k in config if k not in _CONFIG_KEYS]
    if unknown:
        raise UserError(
            f"{path}: unknown key {unknown[0]!r}; the keys are "
            f"{', '.join(_CONFIG_KEYS)}"
        )
    if "estimator" not in config:
        raise UserError(
            f"{path}: no 'estimator' key (one of {', '.join(sorted(_estimators()))})"
        )
    if not isinstance(config.get("params", {}), dict):
        raise UserError(f"{path}: 'params' must be a JSON object")
    for key in ("n_reconstructions", "n_samples"):
        value = config.get(key, _DEFAULT_N_OUTPUTS)
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UserError(f"{path}: {key!r} must be an int >= 0; got {value!r}")
    return config


def _overrides(items: Sequence[str]) -> dict:
    """``--set KEY=VALUE`` arguments: values as JSON, else as strings."""
    params = {}
    for item in items:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set takes KEY=VALUE; got {item!r}")
        try:
            params[key] = json.loads(text)
        except json.JSONDecodeError:
            params[key] = text
    return params


def _make_estimator(config: dict, where: str, overrides: dict):
    """The configured estimator, its parameters checked before any data."""
    from neurovae._validation import validate_params
    from neurovae.persistence import _from_json

    estimators = _estimators()
    name = config["estimator"]
    if not isinstance(name, str) or name not in estimators:
        raise UserError(
            f"{where}: unknown estimator {name!r}; valid estimators: "
            f"{', '.join(sorted(estimators))}"
        )
    cls = estimators[name]
    folder = os.path.dirname(os.path.abspath(where))
    params = dict(config.get("params", {}))
    for key in _PATH_PARAMS:
        value = params.get(key)
        if isinstance(value, str) and not os.path.isabs(value):
            params[key] = os.path.join(folder, value)
    valid = cls().get_params(deep=False)
    for source, given in ((where, params), ("--set", overrides)):
        for key in given:
            if key not in valid:
                close = difflib.get_close_matches(key, list(valid), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise UserError(f"{source}: {name} has no parameter {key!r}{hint}")
    params.update(overrides)
    estimator = cls(**{k: _from_json(v) for k, v in params.items()})
    try:
        validate_params(estimator, cls._parameter_rules)
    except (TypeError, ValueError) as exc:
        raise UserError(_one_line(exc)) from None
    return estimator, params


def _parse_labels(values: list[str]) -> list:
    """Labels as ints if all are ints, else floats if all are, else strings."""
    for kind in (int, float):
        try:
            return [kind(v) for v in values]
        except ValueError:
            continue
    return values


def _read_labels(path: str, column: str | None, files: list[str], n: int) -> list:
    """One label per sample from a text file or a CSV / TSV table.

    A text file holds one label per line, in the order of the samples. A
    table (``.csv`` or ``.tsv``, with a header) takes the labels from
    ``column`` (default: the column ``label``, or the only column that is not
    ``path``); when it has a ``path`` column and the samples are 3-D files,
    rows are matched to the files by file name, otherwise by order.
    """
    lower = path.lower()
    table = lower.endswith((".csv", ".tsv"))
    if column is not None and not table:
        raise UserError("--labels-column needs a .csv or .tsv labels file")
    try:
        with open(path, encoding="utf-8", newline="") as f:
            if table:
                reader = csv.DictReader(
                    f, delimiter="\t" if lower[-3:] == "tsv" else ","
                )
                rows = list(reader)
                columns = list(reader.fieldnames or [])
            else:
                values = [line.strip() for line in f if line.strip()]
    except FileNotFoundError:
        raise UserError(f"labels file {path!r} does not exist") from None
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UserError(f"cannot read labels file {path!r}: {exc}") from None
    if table:
        if column is None:
            others = [c for c in columns if c != "path"]
            column = "label" if "label" in columns else None
            if column is None and len(others) == 1:
                column = others[0]
            if column is None:
                raise UserError(
                    f"{path}: name the label column with --labels-column "
                    f"(columns: {', '.join(columns) or 'none'})"
                )
        if column not in columns:
            raise UserError(
                f"{path}: no column {column!r} (columns: {', '.join(columns)})"
            )
        if "path" in columns and len(files) == n:
            by_name: dict[str, str] = {}
            for row in rows:
                name = os.path.basename(row["path"] or "")
                if name in by_name:
                    raise UserError(f"{path}: the file name {name!r} appears twice")
                by_name[name] = row[column]
            missing = [f for f in files if os.path.basename(f) not in by_name]
            if missing:
                raise UserError(f"{path}: no row for {os.path.basename(missing[0])!r}")
            values = [by_name[os.path.basename(f)] for f in files]
        else:
            values = [row[column] for row in rows]
    if len(values) != n:
        raise UserError(
            f"{path} holds {len(values)} labels, but the data hold {n} samples"
        )
    if any(v is None or v == "" for v in values):
        raise UserError(f"{path}: a label is empty")
    return _parse_labels(values)


def _count_samples(X) -> int:
    if isinstance(X, list):
        return len(X)
    import nibabel as nib

    return int(nib.load(X).shape[3])


def _finite_or_none(value):
    return value if isinstance(value, (int, float)) and math.isfinite(value) else None


def _write_fit_outputs(estimator, X, config, params, outdir) -> list[str]:
    """Write the model and what it made to ``outdir``; returns what went."""
    from neurovae.persistence import _to_json

    written = []
    path = os.path.join(outdir, "model.nvae")
    estimator.save(path)
    written.append("model.nvae")
    history = {
        k: [_finite_or_none(v) for v in _to_json(values, k)]
        for k, values in estimator.history_.items()
    }
    lines = [
        f"  {json.dumps(k)}: {json.dumps(v, allow_nan=False)}"
        for k, v in history.items()
    ]
    with open(os.path.join(outdir, "history.json"), "w", encoding="utf-8") as f:
        f.write("{\n" + ",\n".join(lines) + "\n}\n")  # one term a line
    written.append("history.json")
    effective = {
        "estimator": type(estimator).__name__,
        "params": params,
        "n_reconstructions": config.get("n_reconstructions", _DEFAULT_N_OUTPUTS),
        "n_samples": config.get("n_samples", _DEFAULT_N_OUTPUTS),
    }
    with open(os.path.join(outdir, "config.json"), "w", encoding="utf-8") as f:
        json.dump(effective, f, indent=2)
        f.write("\n")
    written.append("config.json")
    if _save_loss_curve(estimator, os.path.join(outdir, "loss.png")):
        written.append("loss.png")

    n_recon = min(effective["n_reconstructions"], _count_samples(X))
    if n_recon:
        folder = os.path.join(outdir, "reconstructions")
        os.makedirs(folder, exist_ok=True)
        if isinstance(X, list):
            subset = X[:n_recon]
            names = [os.path.basename(p) for p in subset]
            if len(set(names)) < len(names):  # same names in several folders
                names = [f"{i:04d}_{name}" for i, name in enumerate(names)]
        else:
            import nibabel as nib

            subset = nib.load(X).slicer[..., :n_recon]
            names = _volume_names(n_recon, f"{_stem(X)}_")
        recon = estimator.reconstruct(subset)
        _split_volumes(recon, [os.path.join(folder, n) for n in names])
        written.append(f"reconstructions/ ({n_recon})")
    n_samples = effective["n_samples"]
    if n_samples:
        folder = os.path.join(outdir, "samples")
        os.makedirs(folder, exist_ok=True)
        random_state = estimator.random_state
        samples = estimator.sample(n_samples, random_state=random_state)
        names = _volume_names(n_samples, "sample_")
        _split_volumes(samples, [os.path.join(folder, n) for n in names])
        written.append(f"samples/ ({n_samples})")
    return written


def _save_loss_curve(estimator, path: str) -> bool:
    """``plot_history`` to a PNG, without pyplot's global state."""
    try:
        from matplotlib.figure import Figure
    except ImportError:
        print(
            "neurovae: warning: matplotlib is not installed; loss.png not written",
            file=sys.stderr,
        )
        return False
    from neurovae.plotting import plot_history

    figure = Figure(figsize=(6.0, 4.0), layout="constrained")
    ax = figure.add_subplot()
    plot_history(estimator, ax=ax, log_scale=True)
    ax.set_title(f"{type(estimator).__name__}: training loss terms")
    figure.savefig(path, dpi=100)
    return True


def _fit(args: argparse.Namespace) -> int:
    config = _read_config(args.config)
    estimator, params = _make_estimator(config, args.config, _overrides(args.set))
    name = type(estimator).__name__
    files = _expand(args.data)
    X = _niimgs(files)
    n = _count_samples(X)
    y = None
    takes_labels = name == "ContrastiveVAE"
    if args.labels is not None:
        if not takes_labels:
            raise UserError(f"--labels is for ContrastiveVAE; {name} takes none")
        y = _read_labels(args.labels, args.labels_column, files, n)
    elif takes_labels:
        raise UserError(
            "ContrastiveVAE needs a label per image: pass --labels FILE (one "
            "label per line, or a .csv / .tsv table)"
        )
    writer = _rank() == 0  # under torchrun only rank 0 writes
    outdir = args.output
    if writer:
        try:
            os.makedirs(outdir, exist_ok=True)
        except OSError as exc:
            raise UserError(f"cannot create output folder {outdir!r}: {exc}") from None
    tic = time.perf_counter()
    try:
        estimator.fit(X, y)
    except ValueError as exc:  # data or parameters the estimator refuses
        raise UserError(_one_line(exc)) from None
    fit_time = time.perf_counter() - tic
    if not writer:
        return 0
    written = _write_fit_outputs(estimator, X, config, params, outdir)
    history = estimator.history_
    grid = "x".join(str(s) for s in estimator.input_shape_)
    final = f"final loss {history['loss'][-1]:.4g}"
    if history.get("val_loss"):
        final += f", val_loss {history['val_loss'][-1]:.4g}"
    print(
        f"neurovae fit: {name} on {n} images of {grid}, {estimator.n_iter_} "
        f"epochs in {fit_time:.1f} s on {estimator._module_device()}; {final}"
    )
    print(f"wrote to {outdir}: {', '.join(written)}")
    return 0


# ----------------------------------------------------------------------
# sample and transform
# ----------------------------------------------------------------------
def _sample(args: argparse.Namespace) -> int:
    import nibabel as nib

    model = _load_model(args.model)
    name = type(model).__name__
    accepted = inspect.signature(model.sample).parameters
    kwargs = {"random_state": args.random_state}
    for option, value in (("temperature", args.temperature), ("group", args.group)):
        if value is None:
            continue
        if option not in accepted:
            raise UserError(f"--{option}: {name}.sample takes no {option}")
        kwargs[option] = value
    try:
        samples = model.sample(args.n_samples, **kwargs)
    except ValueError as exc:
        raise UserError(_one_line(exc)) from None
    out = args.output
    try:
        if out.lower().endswith(_NIFTI_SUFFIXES):
            folder = os.path.dirname(out)
            if folder:
                os.makedirs(folder, exist_ok=True)
            nib.save(samples, out)
            where = out
        else:
            os.makedirs(out, exist_ok=True)
            names = _volume_names(args.n_samples, "sample_")
            _split_volumes(samples, [os.path.join(out, n) for n in names])
            where = os.path.join(out, f"sample_*.nii.gz ({args.n_samples} files)")
    except OSError as exc:
        raise UserError(f"cannot write {out!r}: {exc}") from None
    print(f"neurovae sample: {args.n_samples} samples of {name} -> {where}")
    return 0


def _transform(args: argparse.Namespace) -> int:
    model = _load_model(args.model)
    files = _expand(args.data)
    X = _niimgs(files)
    try:
        Z = model.transform(X)
    except ValueError as exc:  # images off the model's grid, NaN, ...
        raise UserError(_one_line(exc)) from None
    import numpy as np

    header = ["path"]
    if isinstance(X, list):
        keys = [[path] for path in files]
    else:
        header.append("volume")
        keys = [[X, str(i)] for i in range(len(Z))]
    header += [str(n) for n in model.get_feature_names_out()]
    rows = [key + [str(v) for v in row] for key, row in zip(keys, Z.astype(np.float32))]
    if args.output == "-":
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)
        sys.stdout.flush()
        return 0
    try:
        folder = os.path.dirname(args.output)
        if folder:
            os.makedirs(folder, exist_ok=True)
        with open(args.output, "w", encoding="utf-8", newline="") as f:
            writer = csv.writer(f, lineterminator="\n")
            writer.writerow(header)
            writer.writerows(rows)
    except OSError as exc:
        raise UserError(f"cannot write {args.output!r}: {exc}") from None
    print(
        f"neurovae transform: {len(rows)} samples x {Z.shape[1]} components "
        f"-> {args.output}"
    )
    return 0


# ----------------------------------------------------------------------
# the parser and the entry point
# ----------------------------------------------------------------------
def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an int") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1; got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The ``neurovae`` argument parser.

    Returns
    -------
    argparse.ArgumentParser
        The parser of the ``neurovae`` command and its subcommands ``demo``,
        ``fit``, ``sample`` and ``transform``; each subcommand's function is
        the ``func`` attribute of the parsed namespace.

    Examples
    --------
    >>> argv = ["sample", "model.nvae", "-n", "3", "-o", "out"]
    >>> args = build_parser().parse_args(argv)
    >>> args.command, args.n_samples, args.output
    ('sample', 3, 'out')
    """
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

    data_help = (
        "glob patterns (quoted) or paths of NIfTI files: 3-D images, one "
        "sample each, or a single 4-D image"
    )
    fit = sub.add_parser(
        "fit",
        help="train an estimator from a JSON configuration on NIfTI files",
        description="Train the estimator a JSON configuration describes "
        '(e.g. {"estimator": "VAE", "params": {"n_components": 8}}) on NIfTI '
        "files, and write to OUTDIR: model.nvae (safe format), history.json, "
        "config.json, loss.png, reconstructions/ and samples/. Under torchrun "
        "only rank 0 writes.",
    )
    fit.add_argument("config", metavar="CONFIG", help="JSON configuration file")
    fit.add_argument("data", metavar="DATA", nargs="+", help=data_help)
    fit.add_argument("-o", "--output", metavar="OUTDIR", required=True)
    fit.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="override a parameter (VALUE read as JSON, else as a string); repeatable",
    )
    fit.add_argument(
        "--labels",
        metavar="FILE",
        help="ContrastiveVAE's labels: one per line in the order of the "
        "images, or a .csv / .tsv table (matched by file name when it has a "
        "'path' column)",
    )
    fit.add_argument(
        "--labels-column",
        metavar="NAME",
        help="the table's label column (default: 'label', or its only column)",
    )
    fit.set_defaults(func=_fit)

    sample = sub.add_parser(
        "sample",
        help="draw NIfTI images from a saved model",
        description="Draw images from a model saved in the safe format: one "
        "3-D file per sample (sample_0000.nii.gz, ...) in the folder OUT, or "
        "one 4-D file when OUT ends in .nii or .nii.gz.",
    )
    sample.add_argument("model", metavar="MODEL", help="model file (model.nvae)")
    sample.add_argument("-n", "--n-samples", type=_positive_int, default=1, metavar="N")
    sample.add_argument("-o", "--output", metavar="OUT", required=True)
    sample.add_argument("--random-state", type=int, default=None, metavar="SEED")
    sample.add_argument(
        "--temperature",
        type=float,
        default=None,
        help="prior temperature (VeryDeepVAE)",
    )
    sample.add_argument(
        "--group",
        choices=("target", "background"),
        default=None,
        help="which group to sample (ContrastiveVAE)",
    )
    sample.set_defaults(func=_sample)

    transform = sub.add_parser(
        "transform",
        help="write the latent codes of NIfTI images as CSV",
        description="Write the latent codes (posterior means) of images as "
        "CSV: a header, then one row per image with its path and one column "
        "per component.",
    )
    transform.add_argument("model", metavar="MODEL", help="model file (model.nvae)")
    transform.add_argument("data", metavar="DATA", nargs="+", help=data_help)
    transform.add_argument(
        "-o",
        "--output",
        metavar="CSV",
        default="-",
        help="output file; '-' (the default) writes to stdout",
    )
    transform.set_defaults(func=_transform)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``neurovae`` command.

    Parameters
    ----------
    argv : sequence of str, optional
        The arguments after the program name; by default ``sys.argv[1:]``.

    Returns
    -------
    int
        The exit status: 0 on success, 2 for a user error (reported in one
        line starting with ``neurovae: error:`` on stderr) or no command.
        Invalid arguments exit through ``argparse`` (``SystemExit(2)``).

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
    try:
        return args.func(args)
    except UserError as exc:
        print(f"neurovae: error: {_one_line(exc)}", file=sys.stderr)
        return 2
    except BrokenPipeError:  # `neurovae transform ... | head`: not an error
        try:  # keep the interpreter from complaining when it flushes stdout
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
        except (OSError, ValueError, AttributeError):
            pass
        return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
