"""The install check that ``.ci/run`` runs before any test: the pinned torch/torchaudio pair
(exact, and the same pair the check expects), and every compiled dependency loading here."""

import subprocess
import sys

import tomllib

from conftest import HANG_GUARD_S, REPO

sys.path.insert(0, str(REPO / "scripts"))
from check_install import REQUIRED, TORCH_PAIR, pair_error


def test_torch_and_torchaudio_are_pinned_to_the_checked_pair() -> None:
    """A wildcard (``torchaudio==2.11.*``) once let torchaudio 2.11.1 in beside torch 2.11.0."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = {d.split("==")[0]: d.split("==")[1] for d in project["dependencies"]
            if d.startswith("torch")}
    assert (pins["torch"], pins["torchaudio"]) == TORCH_PAIR
    assert not any("*" in v for v in pins.values())


def test_pair_error_names_both_versions_and_the_fix() -> None:
    assert pair_error("2.11.0+cu130", "2.11.0+cu130") is None
    assert pair_error("2.11.0", "2.11.0") is None
    assert pair_error("2.11.0", "2.11.1") == (
        'torch 2.11.0 with torchaudio 2.11.1: the tested pair is torch 2.11.0 with torchaudio '
        '2.11.0; pip install "torch==2.11.0" "torchaudio==2.11.0"')


def test_this_install_loads_every_compiled_dependency() -> None:
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "check_install.py")],
                          capture_output=True, text=True, timeout=HANG_GUARD_S, check=False)
    assert proc.returncode == 0, proc.stderr
    names = [line.split()[0] for line in proc.stdout.splitlines()]
    assert set(REQUIRED) | {"pip"} <= set(names)
    assert proc.stdout.splitlines()[-1] == "pip check              no broken requirements"
