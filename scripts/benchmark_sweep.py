"""Wall time of one sweep run one job at a time and with jobs in parallel on this machine.

    python scripts/benchmark_sweep.py [--seeds 4] [--rounds 3] [--n-jobs 2]
        [--cache-dir FOLDER] [--out FOLDER] [OVERRIDE ...]

Runs the sweep ``python main.py -m seed=0,...,seeds-1 federation.rounds=ROUNDS logger=[csv]
OVERRIDE ...`` as subprocesses twice: with Hydra's basic launcher (jobs one after another) and
with ``hydra/launcher=joblib hydra.launcher.n_jobs=N``, after one single run has filled the
embedding cache, so both sweeps read the same warm cache. Prints each sweep's wall time, its
jobs' mean ``total_s``, the torch threads each job used (``results.json`` ``environment``) and
the speed-up, with the load average before and after: the machine may be shared, so quote the
load with the figures.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run_main(args: list[str], cwd: Path, cache_dir: Path) -> float:
    """Wall seconds of ``python main.py ARGS`` in ``cwd``; exits with its stderr if it fails."""
    env = {**os.environ, "FEDA2V_CACHE_DIR": str(cache_dir), "WANDB_SILENT": "true"}
    tic = time.perf_counter()
    done = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - tic
    if done.returncode != 0:
        sys.exit(f"error: python main.py {' '.join(args)} failed:\n{done.stderr[-3000:]}")
    return seconds


def job_records(sweep_dir: Path, jobs: int) -> list[dict]:
    """``total_s``, torch threads and whether the embeddings came from the cache, per job."""
    rows = []
    for job in range(jobs):
        results = json.loads((sweep_dir / str(job) / "results.json").read_text())
        rows.append({"total_s": results["timings"]["total_s"],
                     "threads": results["environment"]["cpu_threads"],
                     "cached": results["embeddings"]["audio_cached"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, default=4, help="jobs of the sweep (seed=0..N-1)")
    parser.add_argument("--rounds", type=int, default=3, help="federation.rounds of each job")
    parser.add_argument("--n-jobs", type=int, default=2, help="joblib jobs at once")
    parser.add_argument("--cache-dir", type=Path, default=None,
                        help="embedding cache (default: a fresh folder, filled first)")
    parser.add_argument("--out", type=Path, default=None, help="working folder for the outputs")
    parser.add_argument("overrides", nargs="*", help="more main.py overrides for every job")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="feda2v-sweep-bench-"))
    out.mkdir(parents=True, exist_ok=True)
    cache_dir = args.cache_dir or out / "cache"
    common = ["logger=[csv]", *args.overrides]
    seeds = "seed=" + ",".join(str(s) for s in range(args.seeds))

    fill = run_main([*common, "federation.rounds=1", f"hydra.run.dir={out / 'fill'}"], out,
                    cache_dir)
    common.append(f"federation.rounds={args.rounds}")
    print(f"Cache filled in {fill:.1f} s ({cache_dir}); {os.cpu_count()} CPUs, "
          f"{len(os.sched_getaffinity(0))} usable")
    launchers = {"basic (sequential)": [],
                 f"joblib n_jobs={args.n_jobs}": ["hydra/launcher=joblib",
                                                  f"hydra.launcher.n_jobs={args.n_jobs}"]}
    print(f"{'launcher':<22} {'wall s':>8} {'job total_s':>12} {'threads/job':>12} "
          f"{'load before':>12} {'load after':>11}")
    walls = []
    for index, (label, launcher) in enumerate(launchers.items()):
        sweep_dir = out / f"sweep{index}"
        load = os.getloadavg()[0]
        wall = run_main(["-m", *launcher, *common, seeds, f"hydra.sweep.dir={sweep_dir}"], out,
                        cache_dir)
        jobs = job_records(sweep_dir, args.seeds)
        if not all(job["cached"] for job in jobs):
            sys.exit(f"error: a job of {sweep_dir} recomputed its embeddings: the cache was cold")
        mean = sum(job["total_s"] for job in jobs) / len(jobs)
        threads = sorted({job["threads"] for job in jobs})
        walls.append(wall)
        print(f"{label:<22} {wall:8.1f} {mean:12.1f} {','.join(map(str, threads)):>12} "
              f"{load:12.2f} {os.getloadavg()[0]:11.2f}")
    print(f"speed-up of joblib over sequential: {walls[0] / walls[1]:.2f}x "
          f"({args.seeds} jobs of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
