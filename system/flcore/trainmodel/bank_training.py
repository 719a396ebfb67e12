"""Training of VAE generator banks (:mod:`flcore.trainmodel.generators`), K generators as one
stacked model: each generator draws its own minibatches and noise, masks cover unequal data
sizes, and :mod:`flcore.trainmodel.optim` clips gradients and steps Adam per generator, so
training K generators together equals training each alone. Several nodes' banks train as one
stack (:func:`train_banks`)."""

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Protocol

import torch
import torch.nn.functional as F

from flcore.clients.protocol import PrivacySpec
from flcore.config import GeneratorConfig, OnNan, Precision
from flcore.errors import TrainingError
from flcore.privacy.generator_training import private_epoch
from flcore.trainmodel.optim import NonFiniteFlags, StackedAdam, clip_per_model
from flcore.trainmodel.vae import VAEGenerator, VAELoss

log = logging.getLogger(__name__)


@dataclass
class GeneratorData:
    """Each generator's training rows, padded: ``x [K, n_max, F]``, ``cond [K, n_max, C]``."""

    x: torch.Tensor
    counts: torch.Tensor
    cond: torch.Tensor | None = None


@dataclass
class EpochLog:
    """Per-generator means of one epoch's loss terms ``[K]`` (:class:`VAELossTerms`, each
    minibatch weighted by the generator's rows in it), the epoch's beta and its optimizer steps
    (minibatches of the generator with the most rows). ``log_sigma2`` is the log of the mean
    decoder variance (so under the optimal sigma ``exp(log_sigma2) = mse`` above the floor; NaN
    for a generator without rows) and ``effective_beta`` the mean KL weight relative to the
    negative ELBO at the maximum-likelihood variance."""

    epoch: int
    beta: float
    total: torch.Tensor
    recon: torch.Tensor
    kl: torch.Tensor
    similarity: torch.Tensor
    mse: torch.Tensor
    log_sigma2: torch.Tensor
    effective_beta: torch.Tensor
    steps: int = 0


def _draw(rngs: list[torch.Generator], valid: list[int], shape: tuple[int, ...],
          width: int, device: torch.device) -> torch.Tensor:
    """Standard normal draws ``[K, width, *shape]`` on ``device``: generator k draws only its
    ``valid[k]`` rows from ``rngs[k]`` (the rest are zeros), exactly as it would if trained
    alone. Each ``rngs[k]`` lives on ``device``, so nothing crosses devices."""
    out = torch.zeros(len(rngs), width, *shape, device=device)
    for g, n in enumerate(valid):
        if n:
            out[g, :n] = torch.randn(n, *shape, generator=rngs[g], device=device)
    return out


@dataclass
class _Epoch:
    """One epoch of a stacked training: 0-based ``epoch`` (without the offset), per-generator means
    ``[7, K]`` of the terms of :class:`EpochLog` and each generator's rows at the epoch's start
    (host ints)."""

    epoch: int
    means: torch.Tensor
    counts: list[int]


def _steps(counts: list[int], batch_size: int) -> int:
    """Minibatches of an epoch: those of the generator with the most rows (at least one)."""
    return len(range(0, max(max(counts, default=0), 1), batch_size))


def row_variance(data: GeneratorData) -> torch.Tensor:
    """Each generator's data variance ``[K]``: the per-feature variance of its real rows
    (population form), averaged over the features; the MSE of a decoder that predicts the
    mean."""
    n_max = data.x.shape[1]
    counts = data.counts.to(data.x.device)
    weight = (torch.arange(n_max, device=data.x.device) < counts[:, None]).to(data.x.dtype)
    n = weight.sum(1).clamp(min=1)[:, None]
    mean = (data.x * weight[..., None]).sum(1) / n
    return (((data.x - mean[:, None]) ** 2) * weight[..., None]).sum(1).div(n).mean(-1)


@torch.no_grad()
def start_learned_variance(dec_logvar: torch.Tensor, steps: torch.Tensor, data: GeneratorData,
                           floor: float) -> None:
    """Start the learned ``log sigma^2 [K, 1, 1]`` of each generator that never took a step and
    has rows at the log of its rows' variance (:func:`row_variance`, floored): a calibrated
    start (Rybkin et al. 2021), not sigma = 1, which its own learning rate then tracks."""
    fresh = (steps == 0) & (data.counts.to(steps.device) > 0)
    start = row_variance(data).clamp(min=floor).log().to(dec_logvar.dtype)
    dec_logvar.copy_(torch.where(fresh.view(-1, 1, 1), start.view(-1, 1, 1), dec_logvar))


def _train_stacked(model: VAEGenerator, optimizer: StackedAdam, loss_fn: VAELoss,
                   data: GeneratorData, epochs: int, batch_size: int, grad_clip: float,
                   rngs: list[torch.Generator], noise_std: float, labels: list[str],
                   on_nan: OnNan, precision: Precision,
                   privacy: PrivacySpec | None = None) -> list[_Epoch]:
    """The training loop of :func:`train_generators`, from the loss's schedule epoch
    ``loss_fn.beta.first_epoch`` on, with ``labels[k]`` naming generator k in errors; with
    ``privacy``, DP-SGD (:func:`~flcore.privacy.generator_training.private_epoch`), whose
    learned variance starts at sigma = 1 rather than at the rows' variance (a start read off
    the data would leak it)."""
    offset = loss_fn.beta.first_epoch
    if model.dec_logvar is not None and privacy is None:
        start_learned_variance(model.dec_logvar, optimizer.steps, data, loss_fn.variance_floor)
    out = []
    for epoch in range(epochs):
        counts = [int(c) for c in data.counts.tolist()]
        flags = NonFiniteFlags(data.x.shape[0], data.x.device)
        if privacy is None:
            sums, seen = _epoch(model, optimizer, loss_fn, data, counts, epoch + offset,
                                batch_size, grad_clip, rngs, noise_std, flags, precision)
        else:
            sums, seen = private_epoch(model, optimizer, loss_fn, data.x, data.cond, counts,
                                       epoch + offset, batch_size, rngs, noise_std, privacy,
                                       flags, _draw)
        means = sums / seen.clamp(min=1)
        means[5] = torch.where(seen > 0, means[5].log(), torch.nan)
        out.append(_Epoch(epoch, means, counts))
        _report_non_finite(flags, epoch + offset, labels, on_nan, data)
    return out


def _epoch(model: VAEGenerator, optimizer: StackedAdam, loss_fn: VAELoss, data: GeneratorData,
           counts: list[int], epoch: int, batch_size: int, grad_clip: float,
           rngs: list[torch.Generator], noise_std: float, flags: NonFiniteFlags,
           precision: Precision) -> tuple[torch.Tensor, torch.Tensor]:
    """One epoch of shuffled minibatches at schedule epoch ``epoch``: the loss terms summed
    over each generator's rows ``[7, K]`` and its rows seen ``[K]``.

    No host round trip inside the step loop: minibatch sizes come from the host-side
    ``counts``; masks, step counts and the non-finite flags stay on the device."""
    k, n_max, _ = data.x.shape
    device = data.x.device
    params = list(model.parameters())
    bf16 = precision is Precision.bf16
    perms = torch.full((k, n_max), -1, dtype=torch.long, device=device)
    for g, n in enumerate(counts):
        perms[g, :n] = torch.randperm(n, generator=rngs[g], device=device)
    sums = torch.zeros(7, k, device=device)
    seen = torch.zeros(k, device=device)
    for step, start in enumerate(range(0, max(max(counts, default=0), 1), batch_size)):
        index = perms[:, start : start + batch_size]
        mask = (index >= 0) & ~flags.bad[:, None]
        safe = index.clamp(min=0)
        x = torch.gather(data.x, 1, safe[..., None].expand(-1, -1, data.x.shape[-1]))
        cond = (None if data.cond is None else
                torch.gather(data.cond, 1, safe[..., None].expand(-1, -1, data.cond.shape[-1])))
        valid = [min(max(n - start, 0), batch_size) for n in counts]
        noise = _draw(rngs, valid, (model.latent,), index.shape[1], device)
        if noise_std > 0:
            jitter = _draw(rngs, valid, tuple(x.shape[2:]), index.shape[1], device)
            x = x + noise_std * jitter
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            recon, mu, logvar = model(x, noise, cond)
        if bf16:
            recon, mu, logvar = recon.float(), mu.float(), logvar.float()
        terms = loss_fn(recon, x, mu, logvar, epoch, mask, model.dec_logvar)
        active = mask.any(1)
        active = active & ~flags.update(terms.total, active, step)
        mask = mask & active[:, None]
        for p in params:
            p.grad = None
        torch.where(active, terms.total, 0.0).sum().backward()
        if grad_clip > 0:
            clip_per_model([p.grad for p in params], grad_clip)
        optimizer.step(active)
        batch = mask.sum(1).to(sums.dtype)
        sums += torch.nan_to_num(torch.stack([
            terms.total, terms.recon, terms.kl, terms.similarity, terms.mse, terms.sigma2,
            terms.effective_beta]).detach()) * batch
        seen += batch
    return sums, seen


def _report_non_finite(flags: NonFiniteFlags, epoch: int, labels: list[str], on_nan: OnNan,
                       data: GeneratorData) -> None:
    """Raise TrainingError for the first generator whose loss was not finite this epoch, or
    (``on_nan=drop_generator``) warn about each and zero its rows for the epochs to come."""
    for g in flags.failed():  # the one host round trip of an epoch
        message = f"{labels[g]}, epoch {epoch + 1}: VAE loss is {flags.value[g].item()}"
        if on_nan is OnNan.error:
            raise TrainingError(f"{message}; lower generator.lr or set "
                                "generator.on_nan=drop_generator")
        log.warning("%s: dropping the generator (generator.on_nan=drop_generator)", message)
        data.counts[g] = 0


def train_generators(model: VAEGenerator, optimizer: StackedAdam, loss_fn: VAELoss,
                     data: GeneratorData, epochs: int, batch_size: int, grad_clip: float,
                     rngs: list[torch.Generator], noise_std: float = 0.0, where: str = "",
                     names: list[str] | None = None, on_nan: OnNan = OnNan.error,
                     precision: Precision = Precision.fp32) -> list[EpochLog]:
    """Minibatch training of all K generators together; ``rngs[k]`` (on the data's device)
    drives generator k's shuffling and noise. ``data.counts`` stays on the host. On a NaN or
    infinite loss, raises TrainingError (at the end of that epoch) naming ``where``, the
    generator and the epoch, or with ``on_nan=drop_generator`` stops training that generator
    from that step on (its ``data.counts`` entry becomes 0) and goes on with the others.
    ``precision=bf16`` runs the forward pass under bf16 autocast; the loss, the weights and
    the optimizer stay fp32. The beta schedule starts at ``loss_fn.beta.first_epoch``."""
    labels = [f"{where}generator {names[g] if names else g}" for g in range(data.x.shape[0])]
    epochs_run = _train_stacked(model, optimizer, loss_fn, data, epochs, batch_size, grad_clip,
                                rngs, noise_std, labels, on_nan, precision)
    offset = loss_fn.beta.first_epoch
    return [EpochLog(e.epoch + offset, loss_fn.beta(e.epoch + offset), *e.means,
                     steps=_steps(e.counts, batch_size)) for e in epochs_run]


def learning_rates(model: VAEGenerator, config: GeneratorConfig) -> list[float]:
    """Each parameter's Adam learning rate: ``generator.lr``, and ``generator.variance_lr`` for
    a learned decoder variance, whose optimum (the log reconstruction MSE) lies far from its
    start and moves as the reconstructions improve."""
    return [config.variance_lr if name == "dec_logvar" else config.lr
            for name, _ in model.named_parameters()]


def bank_optimizer(model: VAEGenerator, config: GeneratorConfig) -> StackedAdam:
    """Adam over a bank's generators at :func:`learning_rates`."""
    return StackedAdam(list(model.parameters()), learning_rates(model, config))


class GeneratorBank(Protocol):
    """What bank training needs of a bank (:class:`flcore.trainmodel.generators.GeneratorBank`):
    its stacked model and optimizer, settings, generator names, and the two steps around a
    training."""

    model: VAEGenerator
    optimizer: StackedAdam
    config: GeneratorConfig
    dropped: list[str]

    @property
    def names(self) -> list[str]: ...

    def shape(self) -> tuple[int, int, int, int, bool]: ...

    def data(self, x: torch.Tensor, labels: torch.Tensor,
             prompts: torch.Tensor | None) -> GeneratorData: ...

    def end_training(self, last: EpochLog, dropped: list[bool], where: str) -> None: ...


#: The settings of a bank's training that banks trained together must share.
_SHARED_SETTINGS = ("training_epochs", "batch_size", "grad_clip", "augmentation_noise", "lr",
                    "variance_lr", "on_nan", "schedule_scope", "precision")


def _stack_key(bank: GeneratorBank) -> dict[str, object]:
    features, hidden, latent, cond, learned = bank.shape()
    return {"features": features, "hidden": hidden, "latent": latent, "cond": cond,
            "learned variance": learned, "device": bank.model.enc.weight.device,
            **{key: getattr(bank.config, key) for key in _SHARED_SETTINGS}}


def check_trainable_together(banks: Sequence[GeneratorBank], wheres: Sequence[str]) -> None:
    """Raise ValueError, naming the first bank that differs from the first one and how, unless
    all ``banks`` have the same shapes (features, hidden, latent, cond, learned variance),
    device and training settings (:data:`_SHARED_SETTINGS`)."""
    ours = _stack_key(banks[0])
    for bank, where in zip(banks[1:], wheres[1:], strict=True):
        theirs = _stack_key(bank)
        if theirs != ours:
            diff = ", ".join(f"{key} {_plain(theirs[key])} (vs {_plain(ours[key])})"
                             for key in ours if theirs[key] != ours[key])
            raise ValueError(
                f"{where}generator banks trained together must share (features, hidden, latent, "
                f"cond, learned variance), device and {', '.join(_SHARED_SETTINGS)}; this bank "
                f"differs from {wheres[0].rstrip(': ') or 'the first'} in {diff}")


def _plain(value: object) -> object:
    return value.value if isinstance(value, Enum) else value


def _segments(sizes: list[int], cap: int) -> list[list[tuple[int, int, int]]]:
    """The generators of banks of ``sizes``, in order, cut into chunks of at most ``cap``:
    each chunk a list of ``(bank, start, stop)`` slices."""
    flat = [(i, g) for i, size in enumerate(sizes) for g in range(size)]
    chunks = []
    for lo in range(0, len(flat), cap):
        chunk: list[tuple[int, int, int]] = []
        for i, g in flat[lo : lo + cap]:
            if chunk and chunk[-1][0] == i:
                chunk[-1] = (i, chunk[-1][1], g + 1)
            else:
                chunk.append((i, g, g + 1))
        chunks.append(chunk)
    return chunks


def _concat_data(parts: list[GeneratorData]) -> GeneratorData:
    """Generators of several :class:`GeneratorData` as one, padded to the longest."""
    width = max(p.x.shape[1] for p in parts)

    def pad(t: torch.Tensor) -> torch.Tensor:
        return F.pad(t, (0, 0, 0, width - t.shape[1]))

    cond = None if parts[0].cond is None else torch.cat([pad(p.cond) for p in parts])
    return GeneratorData(torch.cat([pad(p.x) for p in parts]),
                         torch.cat([p.counts for p in parts]), cond)


def train_banks(banks: Sequence[GeneratorBank], xs: Sequence[torch.Tensor],
                labels: Sequence[torch.Tensor], prompts: Sequence[torch.Tensor | None],
                loss: VAELoss, rngs: Sequence[list[torch.Generator]], wheres: Sequence[str],
                max_generators: int | None = None, privacy: PrivacySpec | None = None
                ) -> list[list[EpochLog]]:
    """Train the VAE banks of several nodes as one stacked model: ``bank.fit(xs[i],
    labels[i], prompts[i], loss, rngs[i], wheres[i])`` for every bank, to float tolerance.

    The banks' generators (weights ``[K_i, ...]``, Adam moments and step counts) are
    concatenated along the generator axis, at most ``max_generators`` at a time (``None``: all
    of them; a bank may be split between chunks), trained together, and written back. Each
    generator keeps its own rows, noise and shuffling (``rngs[i][g]``), minibatch order and step
    counts; all follow the beta schedule from ``loss.beta.first_epoch``
    (:func:`~flcore.trainmodel.vae.beta_schedule`). Returns each bank's epoch logs as
    :meth:`GeneratorBank.fit` would. A non-finite loss raises TrainingError naming the
    bank's ``wheres[i]``, the generator and the epoch (or drops it: ``generator.on_nan``).
    Banks must share shapes, device and training settings (:func:`check_trainable_together`).
    With ``privacy``, every generator trains with DP-SGD."""
    n = len(banks)
    if not n:
        return []
    for name, seq in (("xs", xs), ("labels", labels), ("prompts", prompts), ("rngs", rngs),
                      ("wheres", wheres)):
        if len(seq) != n:
            raise ValueError(f"train_banks: {n} banks but {len(seq)} {name}")
    for bank, bank_rngs, where in zip(banks, rngs, wheres, strict=True):
        if len(bank_rngs) != bank.model.k:
            raise ValueError(f"{where}{bank.model.k} generators but {len(bank_rngs)} rngs")
    check_trainable_together(banks, wheres)
    c = banks[0].config
    datas = []
    for bank, x, y, p in zip(banks, xs, labels, prompts, strict=True):
        data = bank.data(x, y, p)
        for name in bank.dropped:
            data.counts[bank.names.index(name)] = 0
        datas.append(data)
    had_rows = [(d.counts > 0).tolist() for d in datas]
    offset = loss.beta.first_epoch
    sizes = [bank.model.k for bank in banks]
    # means[i][e]: bank i's per-generator means of epoch e, piece by piece (chunk by chunk)
    means: list[list[list[torch.Tensor]]] = [[[] for _ in range(c.training_epochs)]
                                             for _ in banks]
    counts: list[list[list[int]]] = [[[] for _ in range(c.training_epochs)] for _ in banks]
    for chunk in _segments(sizes, max_generators or sum(sizes)):
        whole = len(chunk) == 1 and chunk[0][1:] == (0, sizes[chunk[0][0]])
        if whole:
            bank = banks[chunk[0][0]]
            model, optimizer, data = bank.model, bank.optimizer, datas[chunk[0][0]]
        else:
            model, optimizer = _stack(banks, chunk, c)
            data = _concat_data([_slice_data(datas[i], a, b) for i, a, b in chunk])
        chunk_rngs = [r for i, a, b in chunk for r in rngs[i][a:b]]
        chunk_labels = [f"{wheres[i]}generator {banks[i].names[g]}"
                        for i, a, b in chunk for g in range(a, b)]
        epochs_run = _train_stacked(model, optimizer, loss, data, c.training_epochs,
                                    c.batch_size, c.grad_clip, chunk_rngs, c.augmentation_noise,
                                    chunk_labels, c.on_nan, c.precision, privacy)
        if not whole:
            _unstack(banks, chunk, model, optimizer)
        lo = 0
        for i, a, b in chunk:
            if not whole:
                datas[i].counts[a:b] = data.counts[lo : lo + b - a]
            for e in epochs_run:
                means[i][e.epoch].append(e.means[:, lo : lo + b - a])
                counts[i][e.epoch] += e.counts[lo : lo + b - a]
            lo += b - a
    logs = []
    for i, bank in enumerate(banks):
        bank_logs = []
        for e in range(c.training_epochs):
            epoch = e + offset
            bank_logs.append(EpochLog(epoch, loss.beta(epoch), *torch.cat(means[i][e], dim=1),
                                      steps=_steps(counts[i][e], c.batch_size)))
        logs.append(bank_logs)
        # A generator that had rows and has none now was dropped (a NaN zeroed its rows).
        bank.end_training(bank_logs[-1], [had and count == 0 for had, count in zip(
            had_rows[i], datas[i].counts.tolist(), strict=True)], wheres[i])
    return logs


def _slice_data(data: GeneratorData, a: int, b: int) -> GeneratorData:
    return GeneratorData(data.x[a:b], data.counts[a:b].clone(),
                         None if data.cond is None else data.cond[a:b])


def _stack(banks: Sequence[GeneratorBank], chunk: list[tuple[int, int, int]],
           config: GeneratorConfig) -> tuple[VAEGenerator, StackedAdam]:
    """One model and optimizer holding the generators ``chunk`` of ``banks`` (copies)."""
    first = banks[chunk[0][0]].model
    features, hidden, latent, cond, learned = banks[chunk[0][0]].shape()
    k = sum(b - a for _, a, b in chunk)
    model = VAEGenerator(k, features, hidden, latent, cond, learned).to(first.enc.weight.device)
    with torch.no_grad():
        for j, param in enumerate(model.parameters()):
            param.copy_(torch.cat([list(banks[i].model.parameters())[j][a:b]
                                   for i, a, b in chunk]))
    optimizer = bank_optimizer(model, config)
    optimizer.load_state_dict({
        "m": [torch.cat([banks[i].optimizer.m[j][a:b] for i, a, b in chunk])
              for j in range(len(optimizer.m))],
        "v": [torch.cat([banks[i].optimizer.v[j][a:b] for i, a, b in chunk])
              for j in range(len(optimizer.v))],
        "steps": torch.cat([banks[i].optimizer.steps[a:b] for i, a, b in chunk])})
    return model, optimizer


@torch.no_grad()
def _unstack(banks: Sequence[GeneratorBank], chunk: list[tuple[int, int, int]],
             model: VAEGenerator, optimizer: StackedAdam) -> None:
    """Write the trained generators ``chunk`` (weights, Adam moments, step counts) back."""
    lo = 0
    for i, a, b in chunk:
        sl = slice(lo, lo + b - a)
        bank = banks[i]
        for target, source in zip(bank.model.parameters(), model.parameters(), strict=True):
            target[a:b] = source[sl]
        for target, source in zip(bank.optimizer.m + bank.optimizer.v,
                                  optimizer.m + optimizer.v, strict=True):
            target[a:b] = source[sl]
        bank.optimizer.steps[a:b] = optimizer.steps[sl]
        lo += b - a


