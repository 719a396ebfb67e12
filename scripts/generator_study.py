"""Milestone 7's targets on the bundled data with the defaults, as one table.

    python scripts/generator_study.py [--rounds 10] [--out DIR]

Runs ``python main.py``'s default job at each listed setting (the warm-up sweep, the seed's
``likelihood=mse`` reference row, the closed-form ``model=gaussian`` floor, FedAvg alone and
fedavg+synthetic at every granularity), prints the final metrics, then each target with PASS or
FAIL: no collapse (``gen/active_units`` >= latent_dim / 4, ``gen/spread_ratio`` in [0.5, 1.5]),
the VAE's ``synthetic/acc`` at least the Gaussian floor's, fedavg+synthetic ``global/acc`` at
least FedAvg's minus 0.01 at every granularity, and distinct KL for the warm-up ratios.
"""

import argparse
import logging
import tempfile
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir

import flcore  # noqa: F401  (registers the schema and resolvers)
from flcore.run import run

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
GROUPS = "+generator.class_groups={tonal:[rising_chirp,falling_chirp,high_whistle,siren_wail]," \
         "impulsive:[click_train,heartbeat_thump,bell_ring]," \
         "noisy:[rain_like_noise,buzzing_insect,low_engine_hum]}"
SETTINGS: dict[str, tuple[str, ...]] = {
    "vae warmup 0.25": ("generator.beta_warmup_ratio=0.25",),
    "vae warmup 0.5 (default)": (),
    "vae warmup 0.75": ("generator.beta_warmup_ratio=0.75",),
    "vae warmup 1.0": ("generator.beta_warmup_ratio=1.0",),
    "likelihood=mse (seed)": ("generator.likelihood=mse",),
    "model=gaussian": ("generator.model=gaussian",),
    "fedavg alone": ("generator=none",),
    "fedavg+synthetic unified": ("generator=unified",),
    "fedavg+synthetic per_group": ("generator=per_group", GROUPS),
}
COLUMNS = ("global/acc", "synthetic/acc", "gen/active_units", "gen/kl", "gen/spread_ratio",
           "gen/fd", "generator/steps_per_epoch")


def run_setting(overrides: tuple[str, ...], rounds: int, folder: Path) -> dict[str, Any]:
    with initialize_config_dir(config_dir=str(CONFIGS), version_base="1.3"):
        cfg = compose("config", overrides=["logger=none", "checkpoint.every=0",
                                           f"federation.rounds={rounds}", *overrides])
    return run(cfg, run_dir=folder)["final"]


def show(value: Any) -> str:
    return "—" if value is None else f"{value:.4g}"


def targets(finals: dict[str, dict[str, Any]], latent_dim: int) -> list[tuple[str, bool]]:
    vae, mse = finals["vae warmup 0.5 (default)"], finals["likelihood=mse (seed)"]
    fedavg = finals["fedavg alone"]["global/acc"]
    synthetic = {"per_class": vae, "unified": finals["fedavg+synthetic unified"],
                 "per_group": finals["fedavg+synthetic per_group"]}
    kls = [round(finals[f"vae warmup {r}"]["gen/kl"], 4) for r in ("0.25", "0.75", "1.0")]
    kls.append(round(vae["gen/kl"], 4))
    checks = [
        (f"gen/active_units {vae['gen/active_units']:.3g} >= latent_dim/4 = {latent_dim / 4:g}",
         vae["gen/active_units"] >= latent_dim / 4),
        (f"gen/spread_ratio {vae['gen/spread_ratio']:.3g} in [0.5, 1.5]",
         0.5 <= vae["gen/spread_ratio"] <= 1.5),
        (f"vae synthetic/acc {vae['synthetic/acc']:.4g} >= gaussian's "
         f"{finals['model=gaussian']['synthetic/acc']:.4g}",
         vae["synthetic/acc"] >= finals["model=gaussian"]["synthetic/acc"]),
        (f"warm-up ratios give different KL ({', '.join(map(str, kls))})",
         len(set(kls)) == len(kls)),
        (f"mse reference row kept (KL {mse['gen/kl']:.3g})", "gen/kl" in mse),
    ]
    checks += [(f"fedavg+synthetic {name} global/acc {final['global/acc']:.4g} >= fedavg "
                f"{fedavg:.4g} - 0.01", final["global/acc"] >= fedavg - 0.01)
               for name, final in synthetic.items()]
    return checks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None,
                        help="keep the run folders here (default: a temporary folder)")
    args = parser.parse_args()
    logging.disable(logging.INFO)
    with tempfile.TemporaryDirectory() as scratch:
        out = args.out or Path(scratch)
        finals = {}
        for name, overrides in SETTINGS.items():
            finals[name] = run_setting(overrides, args.rounds, out / name.replace(" ", "_"))
            print(f"done: {name}", flush=True)
    print(f"\n| setting | {' | '.join(COLUMNS)} |")
    print(f"|---|{'---|' * len(COLUMNS)}")
    for name, final in finals.items():
        print(f"| {name} | {' | '.join(show(final.get(c)) for c in COLUMNS)} |")
    print()
    for line, ok in targets(finals, latent_dim=32):
        print(f"{'PASS' if ok else 'FAIL'}  {line}")


if __name__ == "__main__":
    main()
