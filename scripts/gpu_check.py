"""One GPU, verified: the CUDA tests, the speed-ups batching aims for, the bf16 paths, a
50-class per-class run and an fp16 render, in one command that prints one table and exits
non-zero when a check fails (on CUDA, a figure below its target fails too).

    python scripts/gpu_check.py                         # on a GPU machine: about 5 minutes
    python scripts/gpu_check.py --wheels wheelhouse     # first put the carried wheels on the path
    python scripts/gpu_check.py --device cpu            # the dry run CI executes: small sizes

``--wheels DIR`` installs every wheel of DIR (built as docs/scaling.md says) into
``DIR/site`` without dependencies and puts it, with ``system/``, on every check's path, so a
machine whose Python has torch and nothing else runs the project. Each check runs in its own
process with a time limit, so one failure costs that row only.
"""

import argparse
import json
import math
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Sizes:
    """How big each check is: the GPU's sizes, or the CPU dry run's small ones."""

    generator_classes: int
    generator_epochs: int
    clients: tuple[int, int]
    tiny_clients: int
    run_rounds: int
    many_classes: int
    many_rounds: int


GPU = Sizes(generator_classes=50, generator_epochs=10, clients=(5, 50), tiny_clients=1000,
            run_rounds=3, many_classes=50, many_rounds=20)
DRY = Sizes(generator_classes=4, generator_epochs=1, clients=(2, 4), tiny_clients=12,
            run_rounds=2, many_classes=6, many_rounds=2)


@dataclass
class Row:
    """One line of the table: what was checked, what it measured, its target and verdict
    (a target the dry run misses is not ``enforced``)."""

    check: str
    figure: str
    target: str = ""
    ok: bool = True
    enforced: bool = True

    @property
    def result(self) -> str:
        """``ok``, ``FAIL``, or (a missed target of the CPU dry run) that it ran."""
        if self.ok:
            return "ok"
        return "FAIL" if self.enforced else "ran (target not enforced)"


def python(code: str, env: dict[str, str], timeout: float) -> str:
    """Run ``code`` in a fresh interpreter; its stdout, or RuntimeError with its last error."""
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        raise RuntimeError(done.stderr.strip().splitlines()[-1] if done.stderr.strip()
                           else f"exit status {done.returncode}")
    return done.stdout


def main_py(args: list[str], env: dict[str, str], timeout: float, folder: Path) -> dict:
    """``python main.py ARGS`` into ``folder``; its ``results.json``."""
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args, "logger=[csv]",
                           "checkpoint.every=0", f"hydra.run.dir={folder}"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)
    if done.returncode != 0:
        lines = (done.stderr or done.stdout).strip().splitlines()
        raise RuntimeError(lines[-1].removeprefix("error: ") if lines
                           else f"exit status {done.returncode}")
    return json.loads((folder / "results.json").read_text())


def round_seconds(results: dict) -> float:
    """Mean ``time/round_s`` after the first round (it warms up)."""
    times = [r["time/round_s"] for r in results["rounds"] if r.get("round", 0) >= 2
             and "time/round_s" in r]
    return sum(times) / len(times)


def cuda_tests(device: str, env: dict[str, str], sizes: Sizes, tmp: Path) -> list[Row]:
    done = subprocess.run([sys.executable, "-m", "pytest", "-m", "gpu", "-q",
                           "-p", "no:cacheprovider", "tests"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=240, check=False)
    summary = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else done.stderr
    passed = int(m.group(1)) if (m := re.search(r"(\d+) passed", summary)) else 0
    ok = done.returncode == 0 and (device == "cpu" or passed > 0)
    return [Row("CUDA tests (pytest -m gpu)", summary.strip("= "), "all pass", ok)]


def generators(device: str, env: dict[str, str], sizes: Sizes, tmp: Path) -> list[Row]:
    out = python(
        "import json, sys; sys.path.insert(0, 'scripts');"
        "from benchmark_generators import class_loop_seconds;"
        f"print(json.dumps(class_loop_seconds('{device}', {sizes.generator_classes}, 32,"
        f" {sizes.generator_epochs}, 32)))", env, 300)
    batched, loop = json.loads(out)
    return [Row(f"generators: {sizes.generator_classes} classes batched vs class loop",
                f"{loop / batched:.1f}x ({batched:.2f} s vs {loop:.2f} s)", ">= 5x",
                loop / batched >= 5, device != "cpu")]


def rounds(device: str, env: dict[str, str], sizes: Sizes, tmp: Path) -> list[Row]:
    cases = [(sizes.clients[0], 256, ""), (sizes.clients[1], 256, ">= 15x"),
             (sizes.tiny_clients, 16, ">= 50x")]
    rows = []
    for nodes, hidden, target in cases:
        out = python(
            "import json, sys; sys.path.insert(0, 'scripts');"
            "from benchmark_rounds import measure;"
            f"print(json.dumps([measure({nodes}, e, 3, None, '{device}', {hidden})['round_s']"
            " for e in ('sequential', 'batched')]))", env, 300)
        sequential, batched = json.loads(out)
        ratio = sequential / batched
        wanted = float(target[3:-1]) if target else 0.0
        rows.append(Row(f"rounds: {nodes} clients, adapter hidden {hidden}, batched vs "
                        "sequential", f"{ratio:.1f}x ({batched * 1e3:.0f} ms vs "
                        f"{sequential * 1e3:.0f} ms)", target,
                        ratio >= wanted, device != "cpu"))
    return rows


def default_run(device: str, env: dict[str, str], sizes: Sizes, tmp: Path) -> list[Row]:
    common = [f"device={device}", f"federation.rounds={sizes.run_rounds}"]
    if device == "cpu":
        common += ["dataset=synthetic_small", "audio_encoder=mfcc", "generator.training_epochs=2"]
    times = {e: round_seconds(main_py([*common, f"executor={e}"], env, 300, tmp / e))
             for e in ("sequential", "batched")}
    ratio = times["sequential"] / times["batched"]
    rows = [Row("default run: batched vs sequential", f"{ratio:.1f}x ({times['batched']:.2f} s"
                f" vs {times['sequential']:.2f} s a round)", ">= 3x",
                ratio >= 3, device != "cpu")]
    bf16 = main_py([*common, "adapter.precision=bf16", "generator.precision=bf16"], env, 300,
                   tmp / "bf16")
    acc = bf16["final"]["global/acc"]
    rows.append(Row("default run, bf16 adapter and generators", f"global/acc {acc:.3f}",
                    "finite", math.isfinite(acc)))
    return rows


def many_classes(device: str, env: dict[str, str], sizes: Sizes, tmp: Path) -> list[Row]:
    root = tmp / "esc50_layout"
    python("import sys; sys.path.insert(0, 'scripts');"
           "from gpu_check import write_tones;"
           f"write_tones('{root}', {sizes.many_classes})", env, 120)
    nodes = sizes.many_classes // 5
    results = main_py([f"device={device}", "dataset=esc50", f"dataset.root={root}",
                       "audio_encoder=mfcc", f"federation.partition.num_nodes={nodes}",
                       "federation.partition.classes_per_node=5",
                       f"federation.rounds={sizes.many_rounds}"], env, 300, tmp / "many")
    total = sum(r["time/round_s"] for r in results["rounds"] if "time/round_s" in r)
    return [Row(f"per-class run, {sizes.many_classes} classes, {sizes.many_rounds} rounds",
                f"{total:.0f} s ({total / sizes.many_rounds:.1f} s a round)", "< 120 s",
                total < 120, device != "cpu")]


def render(device: str, env: dict[str, str], sizes: Sizes, tmp: Path) -> list[Row]:
    folder = tmp / "tiny_sd"
    python("import sys; sys.path.insert(0, 'tests');"
           f"from tiny_models import save_tiny_sd; save_tiny_sd(__import__('pathlib').Path("
           f"'{folder}'))", env, 120)
    dtype = "fp16" if device != "cpu" else "fp32"
    results = main_py([f"device={device}", "+experiment=synthetic_sd", f"images.path={folder}",
                       "generator=none", "federation.rounds=1", "images.height=32",
                       "images.width=32", "images.steps=2", f"images.dtype={dtype}",
                       "audio_encoder=mfcc"], env, 300, tmp / "render")
    rendered = len(list((tmp / "render" / "images").rglob("*.png")))
    finite = math.isfinite(results["final"]["global/acc"])
    return [Row(f"tiny SD render ({dtype})", f"{rendered} images", "> 0",
                rendered > 0 and finite)]


CHECKS: list[Callable[[str, dict[str, str], Sizes, Path], list[Row]]] = [
    cuda_tests, generators, rounds, default_run, many_classes, render]


def write_tones(root: str, classes: int, folds: int = 5, clips: int = 2) -> None:
    """An ESC-50-layout folder of ``classes`` classes: a noisy tone per class (its own
    pitch), ``clips`` one-second clips a fold."""
    import numpy as np
    import soundfile as sf

    folder = Path(root)
    (folder / "audio").mkdir(parents=True, exist_ok=True)
    (folder / "meta").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    t = np.arange(16000) / 16000
    lines = ["filename,fold,target,category,esc10,src_file,take"]
    for target in range(classes):
        for fold in range(1, folds + 1):
            for take in range(clips):
                name = f"{fold}-{target}{fold}{take}-A-{target}.wav"
                tone = np.sin(2 * np.pi * 200 * 1.07**target * t)
                audio = 0.3 * tone + 0.05 * rng.standard_normal(t.size)
                sf.write(folder / "audio" / name, audio.astype(np.float32), 16000)
                lines.append(f"{name},{fold},{target},tone_{target},False,"
                             f"{target}{fold}{take},A")
    (folder / "meta" / "esc50.csv").write_text("\n".join(lines) + "\n")


def install_wheels(wheels: Path) -> Path:
    """Install every wheel of ``wheels`` into ``wheels/site`` (no dependencies: torch is the
    machine's); the folder to put on the path."""
    site = wheels / "site"
    found = sorted(str(w) for w in wheels.glob("*.whl"))
    if not found:
        raise SystemExit(f"error: --wheels {wheels}: no .whl files there; build them as "
                         "docs/scaling.md says")
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps",
                    "--no-index", "--target", str(site), *found], check=True)
    return site


#: What the GPU machine's Python brings itself: never carried.
MACHINE_OWN = ("torch", "torchaudio", "triton")


def requirements(extras: tuple[str, ...] = ("images", "privacy")) -> list[str]:
    """``name==version``, as installed here, of every distribution that pyproject.toml's
    dependencies and ``extras`` need, transitively, but torch, torchaudio, triton and CUDA's
    own: what to carry to the GPU machine."""
    from importlib import metadata

    import tomllib
    from packaging.requirements import Requirement

    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    wanted = [Requirement(r).name for r in project["dependencies"]]
    wanted += [Requirement(r).name for e in extras for r in project["optional-dependencies"][e]]
    seen: set[str] = set()
    pins = []
    while wanted:
        name = wanted.pop().lower().replace("_", "-")
        if name in seen or name.startswith("nvidia-") or name in MACHINE_OWN:
            continue
        seen.add(name)
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        pins.append(f"{dist.metadata['Name']}=={dist.version}")
        for line in dist.requires or []:
            req = Requirement(line)
            if req.marker is None or req.marker.evaluate({"extra": ""}):
                wanted.append(req.name)
    return sorted(pins, key=str.lower)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", help="cuda (the check) or cpu (dry run)")
    parser.add_argument("--wheels", type=Path, help="folder of carried wheels to install first")
    parser.add_argument("--requirements", action="store_true",
                        help="print the pins to carry as wheels (docs/scaling.md) and exit")
    args = parser.parse_args(argv)
    if args.requirements:
        print("\n".join(requirements()))
        return 0
    env = {**os.environ, "WANDB_MODE": "disabled"}
    paths = [str(REPO / "system")]
    if args.wheels is not None:
        paths.insert(0, str(install_wheels(args.wheels.resolve())))
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    sizes = DRY if args.device == "cpu" else GPU
    rows: list[Row] = []
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        env.setdefault("FEDA2V_CACHE_DIR", str(Path(tmp) / "cache"))
        for check in CHECKS:
            folder = Path(tmp) / check.__name__
            folder.mkdir()
            try:
                rows += check(args.device, env, sizes, folder)
            except (RuntimeError, subprocess.TimeoutExpired, KeyError, ValueError) as err:
                rows.append(Row(check.__name__, f"error: {err}", "", False))
            print(f"{check.__name__}: done ({time.perf_counter() - tic:.0f} s)", file=sys.stderr,
                  flush=True)
    print(f"\n| check ({args.device}) | figure | target | result |\n|---|---|---|---|")
    for row in rows:
        print(f"| {row.check} | {row.figure} | {row.target} | {row.result} |")
    failed = [r.check for r in rows if not r.ok and r.enforced]
    print(f"\n{len(rows)} checks in {time.perf_counter() - tic:.0f} s, {len(failed)} failed"
          + (f": {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
