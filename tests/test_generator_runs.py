"""Generators inside the federation: granularities, synthetic learning, logging, resume, NaN."""

import json
import math
from collections.abc import Callable
from functools import partial
from pathlib import Path

import pytest
import torch
from omegaconf import DictConfig

from conftest import LEARNING, epoch_rows, write_esc50
from flcore import checkpoint
from flcore.errors import ConfigError, TrainingError
from flcore.run import run

FAST = (*LEARNING, "generator.training_epochs=4", "generator.hidden_dim=32",
        "generator.latent_dim=8", "checkpoint.every=1")


@pytest.fixture
def gen_run(run_config: Callable[..., dict]) -> Callable[..., dict]:
    return partial(run_config, *FAST)



@pytest.mark.parametrize(("overrides", "generators_per_node"), [
    (("generator=unified",), 1),
    (("generator=per_class",), 2),
    (("+experiment=synthetic_pergroup",), None),
])
def test_granularities_train_log_and_share(gen_run, tmp_path: Path,
                                           overrides: tuple[str, ...],
                                           generators_per_node: int | None) -> None:
    results = gen_run("federation.rounds=2", *overrides)
    final = results["final"]
    for key in ("generator/recon_loss", "generator/kl_loss", "generator/beta",
                "generator/weighted_kl", "generator/similarity_loss", "synthetic/acc",
                "synthetic/samples"):
        assert key in final, key
    beta_max = results["config"]["generator"]["beta_max"]
    assert final["generator/beta"] == beta_max
    assert final["generator/weighted_kl"] == pytest.approx(beta_max * final["generator/kl_loss"])
    assert final["synthetic/samples"] == results["partition"]["train_clips"]
    rows = epoch_rows(tmp_path / "run")
    assert [float(r["generator/epoch"]) for r in rows] == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [float(r["generator/beta"]) for r in rows[:4]] == pytest.approx(
        [beta_max * b for b in (0.5, 1, 1, 1)])
    assert "node0/generator/recon_loss" in rows[0]
    # The calibrated decoder (σ-VAE, Rybkin et al. 2021): the KL weight is beta itself at every
    # epoch, and each generator's sigma^2 is logged; a node's one unified generator's is its MSE.
    for row in rows:
        assert float(row["generator/effective_beta"]) == pytest.approx(
            float(row["generator/beta"]), rel=1e-5)
        sigmas = [k for k in row if k.startswith("node0/generator/log_sigma2/")]
        assert len(sigmas) == (generators_per_node or len(sigmas)) and sigmas
        if generators_per_node == 1:
            assert math.exp(float(row["node0/generator/log_sigma2"])) == pytest.approx(
                float(row["node0/generator/mse"]), rel=1e-5)
    assert "generator/log_sigma2" in final
    assert results["timings"]["generator_train_s"] > 0
    assert len(results["generator_epochs"]) == 8


def test_beta_warmup_ratio_is_swept_from_the_command_line(gen_run, tmp_path: Path) -> None:
    gen_run("federation.rounds=1", "generator.training_epochs=10",
            "generator.beta_warmup_ratio=0.25", "generator.beta_max=1")
    betas = [float(r["generator/beta"]) for r in epoch_rows(tmp_path / "run")]
    assert betas[:4] == pytest.approx([1 / 3, 2 / 3, 1, 1])


def test_whole_run_scope_spans_rounds(gen_run, tmp_path: Path) -> None:
    gen_run("federation.rounds=2", "generator.schedule_scope=whole_run", "generator.beta_max=1")
    betas = [float(r["generator/beta"]) for r in epoch_rows(tmp_path / "run")]
    assert betas == pytest.approx([0.25, 0.5, 0.75, 1, 1, 1, 1, 1])


def test_synthetic_only_server_learns_without_client_adapters(
        make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    """Train on synthetic YAMNet embeddings only, test on real clips (TSTR)."""
    overrides = [o for o in FAST if o != "audio_encoder=mfcc"]
    results = run(make_config(*overrides, "federation.rounds=3", "generator.lr=0.01",
                              "server.adapter_training=synthetic"), run_dir=tmp_path)
    final = results["final"]
    assert "train/loss_mean" not in final
    assert final["global/acc"] == final["synthetic/acc"]
    chance = 1 / final["partition/num_classes"]  # zero-shot over the federation's classes
    assert final["synthetic/acc"] > 2 * chance, final


def test_server_generators_and_fixed_sample_counts(gen_run) -> None:
    results = gen_run("federation.rounds=1", "server.generator.granularity=per_class",
                      "generator.synthetic_samples_per_class=7", "generator.conditional=true")
    assert results["final"]["synthetic/samples"] == 7 * 10


@pytest.mark.parametrize("extra", [(), ("generator=unified", "generator.conditional=false",
                                       "generator.sample_noise=true")],
                         ids=["conditional_server", "centroid_labelled_noisy"])
def test_resume_with_generators_is_exact(gen_run, extra: tuple[str, ...]) -> None:
    """A resumed run ends where the straight one does: a conditional server bank, or
    centroid-labelled node and server banks (their majority shares) drawing with decoder
    noise."""
    common = ("server.generator.granularity=unified", *extra)
    straight = gen_run("federation.rounds=3", *common, folder="a")
    gen_run("federation.rounds=2", *common, folder="b")
    resumed = gen_run("federation.rounds=3", *common, "resume=true", folder="b")
    assert resumed["final"] == straight["final"]
    assert resumed["generator_epochs"] == straight["generator_epochs"]
    if extra:
        assert "server/synthetic/majority_share" in straight["final"]


def test_nan_generator_loss_names_node_generator_and_epoch(gen_run, tmp_path: Path) -> None:
    bad = ("generator.lr=1e30", "generator.grad_clip=0", "federation.rounds=1")
    with pytest.raises(TrainingError, match=r"node \d+, round 1: generator \w+, epoch \d+: VAE "
                                            r"loss is (nan|inf)"):
        gen_run(*bad)
    results = gen_run(*bad, "generator.on_nan=drop_generator", folder="dropped")
    assert results["status"] == "completed"
    assert "synthetic/acc" not in results["final"]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "failed"


def test_class_groups_must_name_federation_classes(gen_run) -> None:
    with pytest.raises(ConfigError, match="class_groups names classes the federation does not "
                                          "have: dog"):
        gen_run("generator=per_group", "+generator.class_groups={a:[dog]}")


def test_synthetic_training_needs_generators(make_config: Callable[..., DictConfig]) -> None:
    from flcore.config import validate

    with pytest.raises(ConfigError, match=r"server\.adapter_training=synthetic: needs synthetic"):
        validate(make_config("generator=none", "server.adapter_training=synthetic"))


def test_decoder_sharing_gives_the_same_samples_as_sample_sharing(gen_run) -> None:
    samples = gen_run("federation.rounds=2", folder="samples")
    decoders = gen_run("federation.rounds=2", "generator.share=decoder", folder="decoders")
    assert decoders["final"] == samples["final"]


def test_decoder_sharing_needs_labelled_generators(make_config: Callable[..., DictConfig]) -> None:
    from flcore.config import validate

    with pytest.raises(ConfigError, match=r"generator\.share=decoder: a unified unconditional"):
        validate(make_config("generator=unified", "generator.share=decoder",
                             "generator.conditional=false"))
    assert validate(make_config("generator=unified", "generator.share=decoder"))


def test_knowledge_distillation_trains_the_global_adapter(gen_run) -> None:
    # Teachers label the samples, so what is tested is the distillation, not the generators:
    # the unit tests' reference generator (beta 1, decoder means) at these fast settings.
    results = gen_run("federation.rounds=3", "server.adapter_training=kd",
                      "generator.beta_max=1", "generator.sample_noise=false")
    final = results["final"]
    chance = 1 / final["partition/num_classes"]  # zero-shot over the federation's classes
    assert "train/loss_mean" in final and final["global/acc"] > 2 * chance, final


def test_per_node_granularity_override(gen_run, tmp_path: Path) -> None:
    nodes = ("federation.nodes=[{classes:[rising_chirp,falling_chirp],granularity:unified},"
             "{classes:[click_train,bell_ring,siren_wail]}]")
    gen_run("federation.rounds=1", nodes)
    state = __import__("torch").load(next((tmp_path / "run" / "checkpoints").glob("*.pt")),
                                     weights_only=True)
    generators = state["server"]["generators"]
    assert generators["0"]["names"] == ["all"]
    assert generators["1"]["names"] == ["click_train", "siren_wail", "bell_ring"]


def test_load_from_reuses_generators_and_checks_them(
        gen_run, make_config: Callable[..., DictConfig], tmp_path: Path) -> None:
    gen_run("federation.rounds=2", folder="first")
    first = tmp_path / "first"
    reused = gen_run("federation.rounds=1", f"generator.load_from={first}", folder="second")
    fresh = gen_run("federation.rounds=1", folder="fresh")
    assert reused["final"]["generator/recon_loss"] < fresh["final"]["generator/recon_loss"]
    with pytest.raises(ConfigError, match=r"trained with generator\.latent_dim=8, this run has 16"):
        gen_run("federation.rounds=1", f"generator.load_from={first}", "generator.latent_dim=16",
                folder="third")
    yamnet = [o for o in FAST if o != "audio_encoder=mfcc"]
    with pytest.raises(ConfigError, match=r"trained with audio_encoder\.name=mfcc, this run has "
                                          r"yamnet"):
        run(make_config(*yamnet, "federation.rounds=1", f"generator.load_from={first}"),
            run_dir=tmp_path / "fourth")
    with pytest.raises(ConfigError, match=r"node 0's generators there model"):
        gen_run("federation.rounds=1", f"generator.load_from={first}", "generator=unified",
                folder="fifth")
    latest = checkpoint.checkpoints(first)[-1]
    saved = torch.load(latest, weights_only=True)
    for bank in saved["server"]["generators"].values():
        del bank["model"]["dec_sigma2"]
    torch.save(saved, latest)
    with pytest.raises(ConfigError, match=r"its generators predate the stored decoder variance"):
        gen_run("federation.rounds=1", f"generator.load_from={first}", folder="sixth")


def test_generators_of_adapter_outputs(gen_run, make_config: Callable[..., DictConfig]) -> None:
    """Generators in the text space: their samples are scored by their nearest prompt."""
    from flcore.config import validate

    results = gen_run("federation.rounds=3", "generator.training_data=adapter_output",
                      "server.adapter_training=fedavg")
    final = results["final"]
    assert final["synthetic/samples"] == results["partition"]["train_clips"]
    # Each sample is scored by its nearest prompt among the federation's classes.
    chance = 1 / final["partition/num_classes"]
    assert final["synthetic/prompt_acc"] > 2 * chance, final
    with pytest.raises(ConfigError, match=r"generator\.training_data=adapter_output: samples in "
                                          r"the text space"):
        validate(make_config("generator.training_data=adapter_output"))


def test_a_class_of_one_clip_under_a_ratio_split_is_a_warning_not_a_crash(
        gen_run: Callable[..., dict], tmp_path: Path) -> None:
    """'siren' has one clip: the ratio split keeps it in train, so the node holding siren alone
    has nothing held out; scoring its generator used to crash on the empty held-out rows."""
    rows = [(f"{fold}-{target}{fold}{take}000-A-{target}.wav", fold, target, name)
            for target, name in enumerate(["dog", "rain"]) for fold in range(1, 6)
            for take in range(2)]
    root = write_esc50(tmp_path / "esc", [*rows, ("1-999000-A-2.wav", 1, 2, "siren")])
    results = gen_run("dataset=esc50", f"dataset.root={root}", "dataset.split=ratio",
                      "federation.rounds=1", "federation.partition.num_nodes=3",
                      "federation.partition.classes_per_node=1")
    assert results["status"] == "completed"
    assert results["partition"]["short_clips"] == 21  # 1 s clips; dataset=esc50 states 5 s
    assert results["partition"]["short"]["1-999000-A-2.wav"] == 1.0
    [node] = [n for n in results["partition"]["nodes"] if n["classes"] == ["siren"]]
    assert (node["train"], node["val"], node["test"]) == (1, 0, 0)
    assert (f"node {node['node']}: class 'siren' has no test clips to score its generators on "
            "(its per-class gen/* metrics are undefined)") in results["warnings"]
    undefined = results["generator_quality"]["undefined"]["per_class"][f"node{node['node']}/siren"]
    assert undefined["fd"] == "needs 2 or more real rows, got 0"
    assert undefined["l2_distance"] == "needs 1 or more real rows, got 0"
