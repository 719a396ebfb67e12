"""The audio-to-text-space adapter and its losses.

The adapter maps an audio token sequence ``[L, Da]`` into the text encoder's space: a per-token MLP
(LayerNorm, GELU, dropout) lifts each token, then ``n_latents`` learned queries attend over the
tokens; their mean is the pooled vector that is trained and scored against the class prompts.
A sequence head (when the text encoder gives token sequences) has T more queries over the same
lifted tokens, producing the ``[T, Ds]`` sequence a diffusion pipeline is conditioned on.
The keys have no bias: it would add the same amount to every score of a query, which the softmax
cancels, so its gradient is zero and only rounding noise (which Adam would magnify) moves it.

The forward pass is one function of stacked parameters with a leading client axis
(:func:`adapter_forward`): the module runs it with one client, the batched executor with many.
Its dropout masks are a counter-based hash of a per-step key, so a client draws the same masks
whichever executor trains it and whichever clients train beside it.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from flcore.config import AdapterConfig
from flcore.errors import ConfigError

Params = dict[str, torch.Tensor]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
#: Distinct streams of dropout masks within one step: the token MLP, the attention weights and
#: the sequence head's attention weights.
_SITES = (0x2545F491, 0x4F6CDD1D, 0x1B873593)


def mix32(x: torch.Tensor | int) -> torch.Tensor | int:
    """A bijective 32-bit integer hash (xor-shift-multiply) on int64 values in [0, 2^32); every
    product stays below 2^58, so int64 arithmetic is exact on every device."""
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    x = (((x >> 16) ^ x) * 0x45D9F3B) & _M32
    return (x >> 16) ^ x


def step_keys(seed: int | torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Dropout keys of optimizer steps ``steps`` of a client whose training seed is ``seed``
    (an int, or one per client broadcast against ``steps``)."""
    return mix32((seed & _M32) ^ mix32(steps & _M32))


def keep_mask(keys: torch.Tensor, site: int, shape: torch.Size, p: float) -> torch.Tensor:
    """Dropout's keep mask of ``shape`` (leading axis: one per key) with drop probability
    ``p``: element ``i`` of client ``c`` is dropped when ``hash(key_c, site, i) < p * 2^32``."""
    per_client = math.prod(shape[1:])
    counter = torch.arange(per_client, device=keys.device, dtype=torch.int64)
    base = mix32(keys ^ _SITES[site]).view(-1, 1)
    u = mix32((base ^ (counter * _GOLDEN)) & _M32)
    return (u >= int(p * 2**32)).view(shape)


def _dropout(x: torch.Tensor, keys: torch.Tensor | None, site: int, p: float) -> torch.Tensor:
    """Dropout of ``x [C, B, ...]`` under a key per client ``[C]`` or per sample ``[C, B]``
    (each sample's mask then is the one it would draw as a batch of its own)."""
    if keys is None or p == 0:
        return x
    if keys.dim() == 2:
        mask = keep_mask(keys.flatten(), site, x.flatten(0, 1).shape, p).view(x.shape)
    else:
        mask = keep_mask(keys, site, x.shape, p)
    return x * mask.to(x.dtype) / (1 - p)


@dataclass
class Taped:
    """One affine map of the forward pass as :func:`adapter_outputs` records it for per-sample
    gradient norms: its input and output, and the parameters it applies. ``kind`` is
    ``linear`` (``output = input @ weight^T + bias``; an input without a sample axis is a
    parameter, named ``source``, applied through ``weight_value``), ``scale`` (``output = input
    * weight + bias``, elementwise) or ``shift`` (``output = ... + bias``). ``part`` is the
    third of ``weight`` a linear map uses (the attention's query, key and value projections
    share one weight)."""

    input: torch.Tensor | None
    output: torch.Tensor
    weight: str | None = None
    bias: str | None = None
    kind: str = "linear"
    source: str | None = None
    weight_value: torch.Tensor | None = None
    part: int | None = None


Tape = dict[str, Taped]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [C, ..., in]`` through per-client ``weight [C, out, in]`` and ``bias [C, out]``."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.view(*x.shape[:-1], weight.shape[1])


def _taped(tape: Tape | None, key: str, entry: Taped) -> torch.Tensor:
    if tape is not None:
        tape[key] = entry
    return entry.output


def _lift(params: Params, tokens: torch.Tensor, dropout: float,
          keys: torch.Tensor | None, tape: Tape | None = None) -> torch.Tensor:
    """The per-token MLP: ``[C, B, L, Da]`` to ``[C, B, L, hidden]``."""
    normed = F.layer_norm(tokens, tokens.shape[-1:])
    h = normed * params["norm.weight"][:, None, None] + params["norm.bias"][:, None, None]
    h = _taped(tape, "norm", Taped(normed, h, "norm.weight", "norm.bias", "scale"))
    z = _linear(h, params["lift.weight"], params["lift.bias"])
    h = F.gelu(_taped(tape, "lift", Taped(h, z, "lift.weight", "lift.bias")))
    return _dropout(h, keys, 0, dropout)


def _pool(params: Params, prefix: str, h: torch.Tensor, num_heads: int, dropout: float,
          keys: torch.Tensor | None, site: int, tape: Tape | None = None) -> torch.Tensor:
    """The learned queries of head ``prefix`` attending over the lifted tokens ``h``:
    ``[C, B, L, hidden]`` to ``[C, B, queries, D]``. With a ``tape``, the queries' projection
    is repeated for every sample, so that its gradient is each sample's."""
    c, b, length, _ = h.shape
    attend = prefix + "attend."
    values = _linear(h, params[prefix + "project.weight"], params[prefix + "project.bias"])
    values = _taped(tape, prefix + "project",
                    Taped(h, values, prefix + "project.weight", prefix + "project.bias"))
    d = values.shape[-1]
    wq, wk, wv = params[attend + "in_weight"].chunk(3, dim=1)
    heads, width = num_heads, d // num_heads
    q = _linear(params[prefix + "queries"], wq, params[attend + "query_bias"]).unsqueeze(1)
    if tape is not None:
        q = _taped(tape, attend + "q", Taped(params[prefix + "queries"], q.expand(c, b, -1, -1),
                                             attend + "in_weight", attend + "query_bias",
                                             source=prefix + "queries", weight_value=wq,
                                             part=0))
    q = q.reshape(c, q.shape[1], -1, heads, width).transpose(2, 3)
    k = _linear(values, wk, torch.zeros_like(params[attend + "query_bias"]))
    k = _taped(tape, attend + "k", Taped(values, k, attend + "in_weight", part=1))
    k = k.view(c, b, length, heads, width).transpose(2, 3)
    v = _linear(values, wv, params[attend + "value_bias"])
    v = _taped(tape, attend + "v", Taped(values, v, attend + "in_weight", attend + "value_bias",
                                         part=2))
    v = v.view(c, b, length, heads, width).transpose(2, 3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width), dim=-1)
    weights = _dropout(weights, keys, site, dropout)
    pooled = (weights @ v).transpose(2, 3).reshape(c, b, -1, d)
    out = _linear(pooled, params[attend + "out_weight"], params[attend + "out_bias"])
    return _taped(tape, attend + "out",
                  Taped(pooled, out, attend + "out_weight", attend + "out_bias"))


def adapter_forward(params: Params, tokens: torch.Tensor, num_heads: int, dropout: float,
                    keys: torch.Tensor | None) -> torch.Tensor:
    """``[C, B, L, Da]`` tokens to ``[C, B, n_latents, D]`` under stacked parameters ``[C, ...]``
    (names as in :class:`AudioAdapter`); ``keys [C]`` switch dropout on (None: off)."""
    return _pool(params, "", _lift(params, tokens, dropout, keys), num_heads, dropout, keys, 1)


def adapter_outputs(params: Params, tokens: torch.Tensor, num_heads: int, dropout: float,
                    keys: torch.Tensor | None, tape: Tape | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The latents of :func:`adapter_forward` and, for an adapter with a sequence head, its
    token sequence ``[C, B, T, Ds]`` (the pipeline conditioning), from one pass of the MLP.
    ``tape`` (a dict) receives every affine map of the pass (:class:`Taped`)."""
    h = _lift(params, tokens, dropout, keys, tape)
    latents = _pool(params, "", h, num_heads, dropout, keys, 1, tape)
    if SEQUENCE + "queries" not in params:
        return latents, None
    sequence = _pool(params, SEQUENCE, h, num_heads, dropout, keys, 2, tape)
    sequence = sequence + params[SEQUENCE + "base"][:, None]
    return latents, _taped(tape, SEQUENCE + "base",
                           Taped(None, sequence, bias=SEQUENCE + "base", kind="shift"))


#: Name prefix of the sequence head's parameters.
SEQUENCE = "sequence."
#: Name prefixes of the body: the per-token MLP every head reads. The rest (the attention
#: pooling into the text space and the sequence head) is the head, which decides where each
#: class lands in the text space: FedPer's and FedRep's personal part, FedGen's predictor.
BODY = ("norm.", "lift.")


def is_body(name: str) -> bool:
    """Whether parameter ``name`` belongs to the adapter's body (the per-token MLP)."""
    return name.startswith(BODY)


def head_embed(params: Params, hidden: torch.Tensor, num_heads: int) -> torch.Tensor:
    """The pooled text-space vectors ``[C, B, D]`` the head makes of lifted tokens
    ``hidden [C, B, tokens, hidden_dim]`` (no dropout): FedGen's predictor on generated
    features."""
    return _pool(params, "", hidden, num_heads, 0.0, None, 1).mean(2)


def _attention_pool(owner: nn.Module, hidden_dim: int, width: int, queries: int) -> None:
    """Give ``owner`` the parameters :func:`_pool` reads: a projection of the lifted tokens to
    ``width`` and ``queries`` learned queries attending over them."""
    owner.project = nn.Linear(hidden_dim, width)
    owner.queries = nn.Parameter(torch.randn(queries, width) * width**-0.5)
    owner.attend = nn.Module()
    owner.attend.in_weight = nn.Parameter(nn.init.xavier_uniform_(torch.empty(3 * width, width)))
    owner.attend.query_bias = nn.Parameter(torch.zeros(width))
    owner.attend.value_bias = nn.Parameter(torch.zeros(width))
    out = nn.Linear(width, width)
    owner.attend.out_weight = nn.Parameter(out.weight.detach().clone())
    owner.attend.out_bias = nn.Parameter(torch.zeros(width))


class AudioAdapter(nn.Module):
    """``[B, L, audio_dim]`` audio tokens to ``[B, n_latents, text_dim]``; with
    ``sequence_shape=(T, Ds)`` also a sequence head to ``[B, T, Ds]``: T more queries over the
    same lifted tokens, added to a learned base sequence (:meth:`set_sequence_base`)."""

    def __init__(self, audio_dim: int, text_dim: int, config: AdapterConfig,
                 sequence_shape: tuple[int, int] | None = None) -> None:
        super().__init__()
        for width in (text_dim, *(sequence_shape or ())[1:]):
            if width % config.num_heads:
                raise ConfigError(f"adapter.num_heads={config.num_heads}: must divide the text "
                                  f"embedding size {width}")
        self.num_heads, self.dropout = config.num_heads, config.dropout
        self.norm = nn.LayerNorm(audio_dim)
        self.lift = nn.Linear(audio_dim, config.hidden_dim)
        _attention_pool(self, config.hidden_dim, text_dim, config.n_latents)
        if sequence_shape is not None:
            self.sequence = nn.Module()
            _attention_pool(self.sequence, config.hidden_dim, sequence_shape[1],
                            sequence_shape[0])
            self.sequence.base = nn.Parameter(torch.zeros(sequence_shape))

    @property
    def has_sequence(self) -> bool:
        return hasattr(self, "sequence")

    @torch.no_grad()
    def set_sequence_base(self, targets: torch.Tensor) -> None:
        """Start the sequence head at the mean of the class targets ``[K, T, Ds]``: what every
        prompt shares (start token, template, padding) is then there from the first step."""
        self.sequence.base.copy_(targets.mean(0))

    def _params(self) -> Params:
        return {name: p.unsqueeze(0) for name, p in self.named_parameters()}

    def _key(self, tokens: torch.Tensor, key: torch.Tensor | None) -> torch.Tensor | None:
        """Dropout's key in training mode (``key``, or one drawn from torch's generator)."""
        if not self.training:
            return None
        if self.dropout > 0 and key is None:
            return torch.randint(2**32, (1,), device=tokens.device)
        return key

    def forward(self, tokens: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """Dropout applies in training mode only, with masks from ``key`` (a one-element int64
        tensor, see :func:`step_keys`), or from a key drawn from torch's generator."""
        return adapter_forward(self._params(), tokens.unsqueeze(0), self.num_heads, self.dropout,
                               self._key(tokens, key)).squeeze(0)

    def embed(self, tokens: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per clip ``[B, text_dim]``: the mean of the latents."""
        return self.forward(tokens, key).mean(1)

    def head_embed(self, hidden: torch.Tensor) -> torch.Tensor:
        """:func:`head_embed` of lifted tokens ``[B, tokens, hidden_dim]``: ``[B, text_dim]``."""
        return head_embed(self._params(), hidden.unsqueeze(0), self.num_heads).squeeze(0)

    def outputs(self, tokens: torch.Tensor, key: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`embed`'s vectors ``[B, text_dim]`` and the sequence head's ``[B, T, Ds]``
        (None without one), from one pass."""
        latents, sequence = adapter_outputs(self._params(), tokens.unsqueeze(0), self.num_heads,
                                            self.dropout, self._key(tokens, key))
        return latents.squeeze(0).mean(1), None if sequence is None else sequence.squeeze(0)


class AdapterLoss:
    """``mse``, ``cosine``, ``mse+cosine`` against the class prompt, or ``contrastive`` (InfoNCE
    of the output against every prompt of the label space); plus, for an adapter with a
    sequence head, ``sequence_weight`` times the MSE of its sequence to the class's token
    sequence ``sequence [C, T, Ds]``, relative to the variance of the label space's sequences
    (so that predicting their mean scores about 1)."""

    def __init__(self, config: AdapterConfig, prompts: torch.Tensor,
                 label_space: torch.Tensor, sequence: torch.Tensor | None = None) -> None:
        self.kind = config.loss
        self.mse_weight, self.cosine_weight = config.mse_weight, config.cosine_weight
        self.temperature = config.temperature
        self.sequence_weight = config.sequence_weight
        self.prompts = prompts
        self.sequence = sequence
        # The sequence MSE in units of the class sequences' spread: 1 is what their mean scores,
        # whatever the pipeline's scale (CLIP's and T5's hidden states differ by orders).
        self.sequence_scale = (None if sequence is None else
                               1 / float(sequence[label_space].var(0, correction=0).mean()
                                         .clamp(min=1e-12)))
        self.space_prompts = F.normalize(prompts[label_space], dim=-1)
        self.position = torch.full((prompts.shape[0],), -1, dtype=torch.long,
                                   device=prompts.device)
        self.position[label_space] = torch.arange(len(label_space), device=prompts.device)

    def per_sample(self, output: torch.Tensor, labels: torch.Tensor,
                   sequence: torch.Tensor | None = None) -> torch.Tensor:
        """Each row's loss, for pooled outputs ``[..., D]``, dataset class ids ``[...]`` and
        the sequence head's outputs ``[..., T, Ds]`` (if any)."""
        value = self._pooled(output, labels)
        if sequence is not None:
            target = self.sequence[labels]
            error = (sequence - target).square().mean((-2, -1))
            value = value + self.sequence_weight * self.sequence_scale * error
        return value

    def _pooled(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        if self.kind == "contrastive":
            logits = F.normalize(output, dim=-1) @ self.space_prompts.T / self.temperature
            return F.cross_entropy(logits.flatten(0, -2), self.position[labels].flatten(),
                                   reduction="none").view(labels.shape)
        target = self.prompts[labels]
        mse = (output - target).square().mean(-1)
        cosine = 1 - F.cosine_similarity(output, target, dim=-1)
        if self.kind == "mse":
            return mse
        if self.kind == "cosine":
            return cosine
        return self.mse_weight * mse + self.cosine_weight * cosine

    def __call__(self, output: torch.Tensor, labels: torch.Tensor,
                 sequence: torch.Tensor | None = None) -> torch.Tensor:
        """Mean loss of pooled outputs ``[B, D]`` (and sequences ``[B, T, Ds]``) for dataset
        class ids ``labels``."""
        return self.per_sample(output, labels, sequence).mean()
