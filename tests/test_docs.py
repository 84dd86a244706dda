"""The documentation covers the public API, and its pages are wired up."""

import importlib
import re
from pathlib import Path

import pytest

import neurovae

DOC = Path(__file__).parents[1] / "doc"

# modules whose ``__all__`` is the public API; upper-case constants are
# described in their module's text instead of a page of their own
PUBLIC_MODULES = [
    "neurovae",
    "neurovae.datasets",
    "neurovae.io",
    "neurovae.metrics",
    "neurovae.nn",
    "neurovae.plotting",
    "neurovae.training",
    "neurovae.very_deep",
]


def _api_entries() -> set[str]:
    """Full names listed under an ``autosummary`` of ``doc/api.rst``."""
    names, module, in_summary = set(), None, False
    for line in (DOC / "api.rst").read_text().splitlines():
        if match := re.match(r"\.\. currentmodule:: (\S+)", line):
            module, in_summary = match.group(1), False
        elif line.startswith(".. autosummary::"):
            in_summary = True
        elif in_summary and re.match(r"   [A-Za-z_]\w*$", line):
            names.add(f"{module}.{line.strip()}")
        elif line and not line.startswith(" "):
            in_summary = False
    return names


@pytest.mark.parametrize("module", PUBLIC_MODULES)
def test_every_public_name_has_an_api_page(module):
    entries = _api_entries()
    missing = [
        name
        for name in importlib.import_module(module).__all__
        if not name.startswith("__")
        and not name.isupper()
        and f"{module}.{name}" not in entries
        # the estimators are documented where users import them from
        and not (f"neurovae.{name}" in entries and hasattr(neurovae, name))
    ]
    assert not missing, f"add to doc/api.rst: {module}.{missing}"


def test_api_entries_exist():
    # a stale entry would make autosummary warn; say which one here
    for entry in _api_entries():
        module, name = entry.rsplit(".", 1)
        assert hasattr(importlib.import_module(module), name), entry


def test_api_parser_reads_the_file():
    entries = _api_entries()
    assert "neurovae.VAE" in entries
    assert "neurovae.io.check_niimgs" in entries
    assert "neurovae.training.Engine" in entries


def test_root_toctree_pages_exist():
    index = (DOC / "index.rst").read_text()
    block = index.split(".. toctree::", 1)[1]
    pages = [
        line.strip()
        for line in block.splitlines()[1:]
        if line.startswith("   ") and not line.strip().startswith(":")
    ]
    assert {
        "install",
        "quickstart",
        "user_guide/index",
        "api",
        "benchmarks",
        "changelog",
        "auto_examples/index",
    } <= set(pages)
    for page in pages:
        if page.startswith("auto_examples/"):
            continue  # written by sphinx-gallery at build time
        assert any((DOC / f"{page}{ext}").is_file() for ext in (".rst", ".md")), page


def test_offline_inventories(tmp_path, monkeypatch):
    # the fallback intersphinx inventories of doc/sphinxext: Sphinx's format
    # (a 4-line header, then zlib), one line per name with its page and anchor
    import zlib

    monkeypatch.syspath_prepend(str(DOC / "sphinxext"))
    offline_inventories = importlib.import_module("offline_inventories")
    mapping = offline_inventories.intersphinx_mapping(tmp_path)
    assert set(mapping) == {"sklearn", "nilearn", "nibabel", "numpy", "torch"}
    root, (online, local) = mapping["sklearn"]
    assert root == "https://scikit-learn.org/stable/" and online is None

    def entries(project):
        *header, body = Path(mapping[project][1][1]).read_bytes().split(b"\n", 4)
        assert header[0] == b"# Sphinx inventory version 2"
        assert b"zlib" in header[3]
        lines = zlib.decompress(body).decode().splitlines()
        return {line.split(" ")[0]: line for line in lines}

    sklearn = entries("sklearn")
    assert sklearn["sklearn.pipeline.Pipeline"] == (
        "sklearn.pipeline.Pipeline py:class 1 modules/generated/"
        "sklearn.pipeline.Pipeline.html#sklearn.pipeline.Pipeline -"
    )
    assert sklearn["sklearn.pipeline.Pipeline.fit"].startswith(
        "sklearn.pipeline.Pipeline.fit py:method"
    )
    assert entries("nibabel")["nibabel.Nifti1Image"].endswith(
        "reference/nibabel.nifti1.html#nibabel.nifti1.Nifti1Image -"
    )
    assert (
        "generated/torch.nn.Module.html#torch.nn.Module"
        in entries("torch")["torch.nn.Module"]
    )
    assert "nilearn.maskers.NiftiMasker" in entries("nilearn")
    assert "numpy.ndarray" in entries("numpy")
