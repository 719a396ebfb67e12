"""How the federation learns: rounds, the aggregation rule and its algorithms' keys, the
server's adapter training and privacy, each check refusing with one line
(:func:`~flcore.config.rules.require`)."""

from flcore.choices import (
    AdapterTraining,
    Aggregation,
    Algorithm,
    DecoderVariance,
    GeneratorModel,
    Granularity,
    Likelihood,
    Precision,
)
from flcore.config.rules import require
from flcore.config.schema import Config, FederationConfig


def check_rounds(f: FederationConfig) -> None:
    """How rounds run and the keys of each aggregation rule and algorithm."""
    require(f.rounds >= 1, "federation.rounds", f.rounds, "must be >= 1")
    require(f.local_epochs >= 1, "federation.local_epochs", f.local_epochs, "must be >= 1")
    require(f.eval_every >= 1, "federation.eval_every", f.eval_every, "must be >= 1")
    if f.clients_per_round is not None:
        require(f.clients_per_round >= 1, "federation.clients_per_round", f.clients_per_round,
                 "must be >= 1 (or null to use federation.client_fraction)")
    require(0 < f.client_fraction <= 1, "federation.client_fraction", f.client_fraction,
             "must be in (0, 1]")
    require(f.fedprox_mu >= 0, "federation.fedprox_mu", f.fedprox_mu, "must be >= 0")
    require(f.server_lr is None or f.server_lr > 0, "federation.server_lr", f.server_lr,
             "must be > 0 (or null: the method's default)")
    require(0 <= f.server_momentum < 1, "federation.server_momentum", f.server_momentum,
             "must be in [0, 1)")
    require(len(f.server_betas) == 2 and all(0 <= b < 1 for b in f.server_betas),
             "federation.server_betas", f.server_betas, "must be two values in [0, 1)")
    require(f.server_tau > 0, "federation.server_tau", f.server_tau, "must be > 0")
    require(f.feddyn_alpha > 0, "federation.feddyn_alpha", f.feddyn_alpha, "must be > 0")
    require(f.fedrep_head_epochs >= 1, "federation.fedrep_head_epochs", f.fedrep_head_epochs,
             "must be >= 1")
    require(f.ditto_lambda >= 0, "federation.ditto_lambda", f.ditto_lambda, "must be >= 0")
    g = f.fedgen
    require(g.alpha >= 0, "federation.fedgen.alpha", g.alpha, "must be >= 0 (0 = off)")
    for key in ("noise_dim", "hidden_dim", "tokens", "batch_size", "server_steps"):
        require(getattr(g, key) >= 1, f"federation.fedgen.{key}", getattr(g, key),
                 "must be >= 1")
    require(g.lr > 0, "federation.fedgen.lr", g.lr, "must be > 0")
    require(g.diversity_weight >= 0, "federation.fedgen.diversity_weight", g.diversity_weight,
             "must be >= 0")


#: Aggregations that are algorithms of their own, with client state or personal parts, and
#: do not combine with the server's use of synthetic samples.
CLIENT_ALGORITHMS = frozenset({Aggregation.scaffold, Aggregation.feddyn,
                               Aggregation.fedper, Aggregation.fedrep, Aggregation.ditto,
                               Aggregation.fedgen})


def check_privacy(config: Config) -> None:
    """``privacy.*``, and what DP-SGD covers: the adapters of federated training (every
    aggregation) and the VAE generators."""
    p = config.privacy
    require(p.max_grad_norm > 0, "privacy.max_grad_norm", p.max_grad_norm, "must be > 0")
    require(p.noise_multiplier is None or p.noise_multiplier > 0, "privacy.noise_multiplier",
             p.noise_multiplier, "must be > 0 (or null: derived from privacy.target_epsilon)")
    require(p.target_epsilon is None or p.target_epsilon > 0, "privacy.target_epsilon",
             p.target_epsilon, "must be > 0 (or null)")
    require(p.delta is None or 0 < p.delta < 1, "privacy.delta", p.delta,
             "must be in (0, 1) (or null: a tenth of 1 / a node's training clips)")
    require(p.accountant in ("rdp", "prv"), "privacy.accountant", p.accountant,
             "must be rdp or prv")
    require(p.generator_max_grad_norm > 0, "privacy.generator_max_grad_norm",
             p.generator_max_grad_norm, "must be > 0")
    require(p.client_clip > 0, "privacy.client_clip", p.client_clip, "must be > 0")
    require(p.client_noise_multiplier >= 0, "privacy.client_noise_multiplier",
             p.client_noise_multiplier, "must be >= 0")
    if p.client_level:
        require(config.federation.algorithm is Algorithm.federated
                 and config.server.adapter_training is AdapterTraining.fedavg
                 and config.federation.aggregation not in CLIENT_ALGORITHMS,
                 "privacy.client_level", True, "applies to federated averaging of the adapters "
                 "only: federation.algorithm=federated, server.adapter_training=fedavg (or "
                 "generator=none) and an aggregation of fedavg, mean, fedprox or a server "
                 "optimizer")
    if not p.enabled:
        return
    require(p.noise_multiplier is not None or p.target_epsilon is not None,
             "privacy.noise_multiplier", None, "set it or privacy.target_epsilon")
    if config.generator.enabled:
        check_private_generators(config)
    require(config.federation.algorithm is Algorithm.federated, "federation.algorithm",
             config.federation.algorithm, "shares nothing between nodes, so privacy=dp has "
             "nothing to protect; use federation.algorithm=federated")


def check_server(config: Config) -> None:
    """``server.*``, and the generators and algorithm its adapter training needs."""
    s = config.server
    require(s.synthetic_epochs >= 1, "server.synthetic_epochs", s.synthetic_epochs,
             "must be >= 1")
    require(s.synthetic_mu >= 0, "server.synthetic_mu", s.synthetic_mu, "must be >= 0 (0 = off)")
    if s.adapter_training is not AdapterTraining.fedavg:
        require(config.generator.enabled, "server.adapter_training", s.adapter_training,
                 "needs synthetic samples: set generator.enabled=true")
        require(config.federation.algorithm is Algorithm.federated, "server.adapter_training",
                 s.adapter_training, "applies to federation.algorithm=federated only")
        aggregation = config.federation.aggregation
        require(aggregation not in CLIENT_ALGORITHMS, "federation.aggregation", aggregation,
                 f"is an algorithm of its own and cannot be combined with "
                 f"server.adapter_training={s.adapter_training.value}; set "
                 "server.adapter_training=fedavg (or generator=none)")


def check_private_generators(config: Config) -> None:
    """What DP-SGD of the generators needs: a VAE whose loss treats each row alone and whose
    shares read nothing off the rows but through the trained weights."""
    g = config.generator
    require(g.model is GeneratorModel.vae, "generator.model", g.model,
             "is fitted in closed form to the rows, which DP-SGD does not cover; use "
             "generator.model=vae with privacy=dp")
    if g.likelihood is Likelihood.gaussian:
        require(g.decoder_variance is DecoderVariance.learned, "generator.decoder_variance",
                 g.decoder_variance, "sets each minibatch's variance from its rows' error, "
                 "which couples the rows DP-SGD clips one by one; use "
                 "generator.decoder_variance=learned with privacy=dp (privacy=dp sets it)")
    else:
        require(not g.sample_noise, "generator.sample_noise", True, "draws the noise of "
                 "likelihood=mse at the rows' error, read off the data; set "
                 "generator.sample_noise=false with privacy=dp")
    require(g.conditional or g.granularity is Granularity.per_class, "generator.conditional",
             False, "labels the draws of a generator of several classes by their real rows' "
             "centroids, which DP-SGD does not cover; set generator.conditional=true")
    require(g.precision is Precision.fp32, "generator.precision", g.precision,
             "must be fp32 with privacy=dp")
