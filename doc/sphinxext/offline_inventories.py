"""Intersphinx inventories for building the documentation without a network.

Intersphinx links names such as :class:`sklearn.pipeline.Pipeline` to the
other projects' documentation through their ``objects.inv``. ``conf.py`` asks
for each project's published inventory first; where it cannot be fetched (a
build machine without internet, as our CI), Sphinx falls back to the file
written here, so the links still resolve and a missing network is not a
warning (which ``-W`` would turn into a failed build).

The fallback is derived from the *installed* packages: every public name of
the listed modules, with the address its project's documentation gives such
a name (for example ``modules/generated/<name>.html`` for scikit-learn and
nilearn). It covers the modules our pages refer to; an online build uses the
complete published inventories instead.
"""

from __future__ import annotations

import importlib
import inspect
import warnings
import zlib
from pathlib import Path

# project: (documentation root, [(module, page pattern), ...]). In a page
# pattern, {module} is the module's name, {name} the object's full name.
GENERATED = "modules/generated/{name}.html"
PROJECTS = {
    "sklearn": (
        "https://scikit-learn.org/stable/",
        [
            (module, GENERATED)
            for module in (
                "sklearn.base",
                "sklearn.compose",
                "sklearn.decomposition",
                "sklearn.exceptions",
                "sklearn.linear_model",
                "sklearn.metrics",
                "sklearn.model_selection",
                "sklearn.neural_network",
                "sklearn.pipeline",
                "sklearn.preprocessing",
                "sklearn.svm",
                "sklearn.utils",
            )
        ],
    ),
    "nilearn": (
        "https://nilearn.github.io/stable/",
        [
            (module, GENERATED)
            for module in (
                "nilearn.datasets",
                "nilearn.image",
                "nilearn.maskers",
                "nilearn.masking",
                "nilearn.plotting",
                "nilearn.signal",
            )
        ],
    ),
    "nibabel": (
        "https://nipy.org/nibabel/",
        [
            (module, "reference/{module}.html")
            for module in (
                "nibabel.nifti1",
                "nibabel.spatialimages",
                "nibabel.loadsave",
                "nibabel.funcs",
            )
        ],
    ),
    "numpy": (
        "https://numpy.org/doc/stable/",
        [("numpy", "reference/generated/{name}.html")],
    ),
    "torch": (
        "https://docs.pytorch.org/docs/stable/",
        [
            ("torch", "generated/{name}.html"),
            ("torch.nn", "generated/{name}.html"),
            ("torch.optim", "generated/{name}.html"),
            ("torch.utils.data", "data.html"),
            ("torch.distributed", "distributed.html"),
        ],
    ),
}

# Names documented on a shared page rather than one of their own, and aliases
# that the projects' own inventories also list: (name, role, page#anchor).
EXTRA = {
    "numpy": [
        (
            "numpy.random.Generator",
            "py:class",
            "reference/random/generator.html#numpy.random.Generator",
        ),
        (
            "numpy.random.default_rng",
            "py:function",
            "reference/random/generator.html#numpy.random.default_rng",
        ),
        (
            "numpy.random.RandomState",
            "py:class",
            "reference/random/legacy.html#numpy.random.RandomState",
        ),
    ],
    "torch": [
        ("torch.Tensor", "py:class", "tensors.html#torch.Tensor"),
        ("torch.device", "py:class", "tensor_attributes.html#torch.device"),
        ("torch.dtype", "py:class", "tensor_attributes.html#torch.dtype"),
        ("torch.amp.GradScaler", "py:class", "amp.html#torch.amp.GradScaler"),
        (
            "torch.nn.parallel.DistributedDataParallel",
            "py:class",
            "generated/torch.nn.parallel.DistributedDataParallel.html"
            "#torch.nn.parallel.DistributedDataParallel",
        ),
    ],
    "nibabel": [
        (
            "nibabel.load",
            "py:function",
            "reference/nibabel.loadsave.html#nibabel.loadsave.load",
        ),
        (
            "nibabel.save",
            "py:function",
            "reference/nibabel.loadsave.html#nibabel.loadsave.save",
        ),
        (
            "nibabel.Nifti1Image",
            "py:class",
            "reference/nibabel.nifti1.html#nibabel.nifti1.Nifti1Image",
        ),
    ],
}


def _public_names(module) -> list[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [
            name
            for name, value in vars(module).items()
            if not name.startswith("_")
            and (inspect.isclass(value) or inspect.isfunction(value))
            and (getattr(value, "__module__", None) or "").startswith(module.__name__)
        ]
    return sorted(set(names))


def _entries(module_name: str, pattern: str):
    module = importlib.import_module(module_name)
    for name in _public_names(module):
        try:
            value = getattr(module, name, None)
        except ImportError:  # e.g. scikit-learn's experimental estimators
            continue
        if value is None or inspect.ismodule(value):
            continue
        full = f"{module_name}.{name}"
        page = pattern.format(module=module_name, name=full)
        if inspect.isclass(value):
            role = "py:exception" if issubclass(value, BaseException) else "py:class"
            yield full, role, f"{page}#{full}"
            for attr, member in vars(value).items():
                if attr.startswith("_") or not callable(member):
                    continue
                yield f"{full}.{attr}", "py:method", f"{page}#{full}.{attr}"
        elif callable(value):
            yield full, "py:function", f"{page}#{full}"


def _write(path: Path, project: str, version: str, entries) -> None:
    lines = [f"{name} {role} 1 {uri} -\n" for name, role, uri in sorted(set(entries))]
    header = (
        "# Sphinx inventory version 2\n"
        f"# Project: {project}\n"
        f"# Version: {version}\n"
        "# The remainder of this file is compressed using zlib.\n"
    )
    path.write_bytes(header.encode() + zlib.compress("".join(lines).encode()))


def intersphinx_mapping(outdir: Path) -> dict:
    """Write the fallback inventories to ``outdir`` and return the mapping.

    Each project maps to its documentation root with two inventory
    locations: the published one (``None``), then the local file.
    """
    outdir.mkdir(parents=True, exist_ok=True)
    mapping = {}
    for project, (root, modules) in PROJECTS.items():
        entries = list(EXTRA.get(project, ()))
        with warnings.catch_warnings():  # deprecated aliases warn on access
            warnings.simplefilter("ignore")
            for module_name, pattern in modules:
                entries.extend(_entries(module_name, pattern))
        version = getattr(importlib.import_module(project), "__version__", "")
        path = outdir / f"{project}.inv"
        _write(path, project, version, entries)
        mapping[project] = (root, (None, str(path)))
    return mapping
