"""The gallery examples run end to end (slow: run with ``pytest -m slow``)."""

import runpy
from pathlib import Path

import matplotlib
import pytest

GALLERY = Path(__file__).parents[1] / "examples"
EXAMPLES = sorted(GALLERY.rglob("plot_*.py"))


@pytest.mark.slow
@pytest.mark.parametrize(
    "path", EXAMPLES, ids=lambda p: p.relative_to(GALLERY).as_posix()
)
def test_example_runs(path, monkeypatch):
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    monkeypatch.setattr(plt, "show", lambda *a, **k: None)
    try:
        runpy.run_path(str(path), run_name="__main__")
    finally:
        plt.close("all")


def test_every_example_is_collected():
    # guards the glob above: a short list would make the slow tests vacuous
    assert len(EXAMPLES) == 10, [p.relative_to(GALLERY).as_posix() for p in EXAMPLES]


def test_every_gallery_folder_has_a_header():
    # sphinx-gallery skips a subfolder without GALLERY_HEADER.rst (or README),
    # and its examples would silently vanish from the documentation
    folders = {GALLERY} | {p.parent for p in EXAMPLES}
    folders |= {p for p in GALLERY.iterdir() if p.is_dir() and p.name[0] != "_"}
    for folder in folders:
        assert (folder / "GALLERY_HEADER.rst").is_file(), folder
    # and every example lives one level down, in a topic folder
    assert all(p.parent.parent == GALLERY for p in EXAMPLES)
