"""The ``neurovae`` command line."""

import subprocess
import sys

import pytest

from neurovae.cli import main


def test_demo_prints_comparison(capsys):
    assert main(["demo", "--max-iter", "3", "--n-components", "4"]) == 0
    out = capsys.readouterr().out
    assert "held-out MSE" in out
    assert "linear-probe accuracy" in out
    assert "3 epochs" in out


def test_no_command_prints_help(capsys):
    assert main([]) == 2
    assert "demo" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["demo", "--max-iter", "0"], ["nope"]])
def test_bad_arguments_exit_nonzero(argv):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code != 0


def test_python_dash_m():
    proc = subprocess.run(
        [sys.executable, "-m", "neurovae", "--help"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0
    assert "demo" in proc.stdout
