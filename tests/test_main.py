"""End to end through ``python main.py``: outputs, one-line errors, multirun, folder uniqueness."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import HANG_GUARD_S, REPO, SMALL_DATASET
from flcore.sweep import short_name, swept_keys


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, paths
    return paths[0]


def test_default_run_writes_results_metrics_and_wandb(run_main, tmp_path: Path) -> None:
    proc = run_main()
    assert proc.returncode == 0, proc.stderr
    folder = only(list((tmp_path / "outputs" / "default" / "runs").iterdir()))
    results = json.loads((folder / "results.json").read_text())
    assert results["status"] == "completed" and results["experiment"] == "default"
    assert results["final"]["partition/num_nodes"] == 5
    # Zero-shot over the federation's classes: chance is 1 / their number.
    chance = 1 / results["final"]["partition/num_classes"]
    assert results["final"]["global/acc"] > 2 * chance, results["final"]
    assert results["final"]["local/acc_mean"] > 2 * chance, results["final"]
    assert (folder / "metrics.csv").read_text().count("\n") == 12
    assert (folder / "confusion_matrix.png").is_file()
    assert (folder / "checkpoints" / "round_0010.pt").is_file()
    only(list((folder / "wandb").glob("offline-run-*")))
    log = (folder / "main.log").read_text()
    assert "rising_chirp" in log
    assert [line.split("round ")[1].split(":")[0] for line in log.splitlines()
            if "[flcore.servers.serverbase][INFO] - round " in line] == [
        f"{r}/10" for r in range(1, 11)]
    accepted = [line for line in log.splitlines() if "synthetic fine-tuning accepted" in line]
    assert len(accepted) == results["final"]["synthetic/accepted_rounds"] > 0, accepted
    assert "\r" not in log
    assert (folder / "plots" / "metrics.png").stat().st_size > 1000
    assert (folder / "plots" / "generator.png").stat().st_size > 1000
    assert (folder / ".hydra" / "config.yaml").is_file()
    environment = results["environment"]
    assert environment["overrides"] == [SMALL_DATASET] and environment["git_commit"]
    assert environment["packages"]["torch"].startswith("2.11")
    assert len(environment["dataset_fingerprint"]) == 64
    assert results["final"]["generator/steps_per_epoch"] == 3.0  # 24 rows per class, batch 8


@pytest.mark.parametrize(("args", "line"), [
    (["generator.beta_warmup_ratio=1.5"],
     "error: generator.beta_warmup_ratio=1.5: must be in (0, 1]"),
    (["+genrator.beta_warmup_ratio=0.25"], "error: genrator: not a config key; did you mean "
                                           "generator? (docs/configuration.md lists every key)"),
    (["executor=sequential", "executor.clients_per_batch=8"],
     "error: executor.clients_per_batch=8: applies to executor=batched and executor=ray only, "
     "not executor=sequential; drop it"),
])
def test_refused_config_leaves_no_run_folder(run_main, tmp_path: Path, args: list[str],
                                             line: str) -> None:
    proc = run_main(*args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [line], proc.stderr
    assert not (tmp_path / "outputs").exists()


@pytest.mark.parametrize(("args", "line"), [
    (["generator=foo"], "error: generator=foo: no such option; available: none, per_class, "
                        "per_group, unified"),
    (["seed=abc"], "error: seed=abc: must be an integer"),
    (["dataset.name=foo"], "error: dataset.name=foo: must be one of synthetic, esc50, folder"),
    (["server.adapter_training=bogus"], "error: server.adapter_training=bogus: must be one of "
                                        "fedavg, synthetic, fedavg+synthetic, kd"),
    (["-m", "deterministic=maybe,true"], "error: deterministic=maybe: must be true or false"),
    (["genrator.beta_warmup_ratio=0.25"], "error: genrator.beta_warmup_ratio: not a config key; "
                                          "did you mean generator.beta_warmup_ratio? "
                                          "(docs/configuration.md lists every key)"),
    (["federation.rounds=[1"], "error: federation.rounds=[1: cannot parse it (no viable "
                               "alternative at input '[1'); see "
                               "https://hydra.cc/docs/1.2/advanced/override_grammar/basic"),
])
def test_hydra_compose_errors_are_one_line(run_main, args: list[str], line: str) -> None:
    proc = run_main(*args)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [line], proc.stderr


def test_hydra_full_error_keeps_the_trace(run_main, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HYDRA_FULL_ERROR", "1")
    proc = run_main("generator=foo")
    assert proc.returncode == 1
    assert "Traceback (most recent call last):" in proc.stderr
    assert ("hydra.errors.MissingConfigException: In 'config': Could not find 'generator/foo'\n"
            in proc.stderr)
    assert "error: " not in proc.stderr


def test_refused_sweep_job_keeps_its_failed_record(run_main, tmp_path: Path) -> None:
    proc = run_main("-m", "generator.beta_warmup_ratio=1.5", "logger=none")
    assert proc.returncode == 1
    job = only(list((tmp_path / "outputs" / "default" / "multiruns").glob("*/0")))
    results = json.loads((job / "results.json").read_text())
    assert results["status"] == "failed"
    assert results["error"] == "ConfigError: generator.beta_warmup_ratio=1.5: must be in (0, 1]"


@pytest.mark.parametrize(("args", "line"), [
    (["dataset=esc50", "dataset.root=/nowhere"], "error: dataset.root=/nowhere: folder not found;"),
    (["federation.nodes=[{classes:[dgo]}]"], "error: federation.nodes[0].classes: unknown class "
                                             "'dgo'"),
])
def test_bad_input_stops_with_one_error_line(run_main, tmp_path: Path, args: list[str],
                                             line: str) -> None:
    proc = run_main(*args, "logger=none")
    assert proc.returncode != 0
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith(line), proc.stderr
    assert "Traceback" not in proc.stderr
    folder = only(list((tmp_path / "outputs" / "default" / "runs").iterdir()))
    assert json.loads((folder / "results.json").read_text())["status"] == "failed"


def test_multirun_gives_separate_folders_and_wandb_runs(run_main, tmp_path: Path) -> None:
    proc = run_main("-m", "seed=1,2", "logger=[wandb]", "federation.rounds=1",
                    "generator.training_epochs=2")
    assert proc.returncode == 0, proc.stderr
    sweep = only(list((tmp_path / "outputs" / "default" / "multiruns").iterdir()))
    jobs = sorted(p for p in sweep.iterdir() if p.is_dir())
    assert [p.name for p in jobs] == ["0", "1"]
    run_files = [only(list(job.glob("wandb/offline-run-*/run-*.wandb"))) for job in jobs]
    assert run_files[0].name != run_files[1].name
    for seed, (job, run_file) in enumerate(zip(jobs, run_files, strict=True), start=1):
        assert json.loads((job / "results.json").read_text())["config"]["seed"] == seed
        data = run_file.read_bytes()
        assert f"default-{sweep.name}".encode() in data
        assert f"seed={seed}".encode() in data
    # The wandb run name holds the swept keys only, shortened.
    assert swept_keys(sweep) == {"seed"}
    overrides = json.loads((jobs[0] / "results.json").read_text())["environment"]["overrides"]
    assert short_name(overrides, swept_keys(sweep)) == "seed=1"
    assert short_name(["+experiment=x", "generator.beta_warmup_ratio=0.25", "seed=1"],
                      {"generator.beta_warmup_ratio", "seed"}) == "beta_warmup_ratio=0.25,seed=1"


def test_two_runs_started_together_get_different_folders(cache_dir: Path, tmp_path: Path) -> None:
    """The folder name's time part is the same for both; the process id keeps them apart."""
    env = {**os.environ, "FEDA2V_CACHE_DIR": str(cache_dir)}
    command = [sys.executable, str(REPO / "main.py"), SMALL_DATASET, "logger=none",
               "federation.rounds=1", "generator=none", "server.adapter_training=fedavg",
               "hydra.run.dir=outputs/same/fixed-time_${feda2v.process_id:}"]
    procs = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL) for _ in range(2)]
    assert [p.wait(timeout=HANG_GUARD_S) for p in procs] == [0, 0]
    folders = list((tmp_path / "outputs" / "same").iterdir())
    assert len(folders) == 2
    assert all((f / "results.json").is_file() for f in folders)
