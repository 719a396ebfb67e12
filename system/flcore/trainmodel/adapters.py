"""The audio-to-text-space adapter and its losses.

The adapter maps an audio token sequence ``[L, Da]`` into the text encoder's space: a per-token MLP
(LayerNorm, GELU, dropout) lifts each token, then ``n_latents`` learned queries attend over the
tokens. One latent gives a pooled vector; more give a token sequence (for diffusion conditioning).
The keys have no bias: it would add the same amount to every score of a query, which the softmax
cancels, so its gradient is zero and only rounding noise (which Adam would magnify) moves it.

The forward pass is one function of stacked parameters with a leading client axis
(:func:`adapter_forward`): the module runs it with one client, the batched executor with many.
Its dropout masks are a counter-based hash of a per-step key, so a client draws the same masks
whichever executor trains it and whichever clients train beside it.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn

from flcore.config import AdapterConfig
from flcore.errors import ConfigError

Params = dict[str, torch.Tensor]

_M32 = 0xFFFFFFFF
_GOLDEN = 0x9E3779B1
#: Distinct streams of dropout masks within one step: the token MLP and the attention weights.
_SITES = (0x2545F491, 0x4F6CDD1D)


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
    if keys is None or p == 0:
        return x
    return x * keep_mask(keys, site, x.shape, p).to(x.dtype) / (1 - p)


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """``x [C, ..., in]`` through per-client ``weight [C, out, in]`` and ``bias [C, out]``."""
    flat = x.reshape(x.shape[0], -1, x.shape[-1])
    out = torch.baddbmm(bias.unsqueeze(1), flat, weight.transpose(1, 2))
    return out.view(*x.shape[:-1], weight.shape[1])


def adapter_forward(params: Params, tokens: torch.Tensor, num_heads: int, dropout: float,
                    keys: torch.Tensor | None) -> torch.Tensor:
    """``[C, B, L, Da]`` tokens to ``[C, B, n_latents, D]`` under stacked parameters ``[C, ...]``
    (names as in :class:`AudioAdapter`); ``keys [C]`` switch dropout on (None: off)."""
    c, b, length, _ = tokens.shape
    h = F.layer_norm(tokens, tokens.shape[-1:])
    h = h * params["norm.weight"][:, None, None] + params["norm.bias"][:, None, None]
    h = F.gelu(_linear(h, params["lift.weight"], params["lift.bias"]))
    h = _dropout(h, keys, 0, dropout)
    values = _linear(h, params["project.weight"], params["project.bias"])
    d = values.shape[-1]
    wq, wk, wv = params["attend.in_weight"].chunk(3, dim=1)
    heads, width = num_heads, d // num_heads
    q = _linear(params["queries"], wq, params["attend.query_bias"])
    q = q.view(c, 1, -1, heads, width).transpose(2, 3)
    k = _linear(values, wk, torch.zeros_like(params["attend.query_bias"]))
    k = k.view(c, b, length, heads, width).transpose(2, 3)
    v = _linear(values, wv, params["attend.value_bias"]).view(c, b, length, heads, width)
    v = v.transpose(2, 3)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(width), dim=-1)
    weights = _dropout(weights, keys, 1, dropout)
    pooled = (weights @ v).transpose(2, 3).reshape(c, b, -1, d)
    return _linear(pooled, params["attend.out_weight"], params["attend.out_bias"])


class AudioAdapter(nn.Module):
    """``[B, L, audio_dim]`` audio tokens to ``[B, n_latents, text_dim]``."""

    def __init__(self, audio_dim: int, text_dim: int, config: AdapterConfig) -> None:
        super().__init__()
        if text_dim % config.num_heads:
            raise ConfigError(f"adapter.num_heads={config.num_heads}: must divide the text "
                              f"embedding size {text_dim}")
        self.num_heads, self.dropout = config.num_heads, config.dropout
        self.norm = nn.LayerNorm(audio_dim)
        self.lift = nn.Linear(audio_dim, config.hidden_dim)
        self.project = nn.Linear(config.hidden_dim, text_dim)
        self.queries = nn.Parameter(torch.randn(config.n_latents, text_dim) * text_dim**-0.5)
        self.attend = nn.Module()
        self.attend.in_weight = nn.Parameter(nn.init.xavier_uniform_(
            torch.empty(3 * text_dim, text_dim)))
        self.attend.query_bias = nn.Parameter(torch.zeros(text_dim))
        self.attend.value_bias = nn.Parameter(torch.zeros(text_dim))
        out = nn.Linear(text_dim, text_dim)
        self.attend.out_weight = nn.Parameter(out.weight.detach().clone())
        self.attend.out_bias = nn.Parameter(torch.zeros(text_dim))

    def forward(self, tokens: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """Dropout applies in training mode only, with masks from ``key`` (a one-element int64
        tensor, see :func:`step_keys`), or from a key drawn from torch's generator."""
        if self.training and self.dropout > 0 and key is None:
            key = torch.randint(2**32, (1,), device=tokens.device)
        params = {name: p.unsqueeze(0) for name, p in self.named_parameters()}
        return adapter_forward(params, tokens.unsqueeze(0), self.num_heads, self.dropout,
                               key if self.training else None).squeeze(0)

    def embed(self, tokens: torch.Tensor, key: torch.Tensor | None = None) -> torch.Tensor:
        """One vector per clip ``[B, text_dim]``: the mean of the latents."""
        return self.forward(tokens, key).mean(1)


class AdapterLoss:
    """``mse``, ``cosine``, ``mse+cosine`` against the class prompt, or ``contrastive`` (InfoNCE
    of the output against every prompt of the label space)."""

    def __init__(self, config: AdapterConfig, prompts: torch.Tensor,
                 label_space: torch.Tensor) -> None:
        self.kind = config.loss
        self.mse_weight, self.cosine_weight = config.mse_weight, config.cosine_weight
        self.temperature = config.temperature
        self.prompts = prompts
        self.space_prompts = F.normalize(prompts[label_space], dim=-1)
        self.position = torch.full((prompts.shape[0],), -1, dtype=torch.long,
                                   device=prompts.device)
        self.position[label_space] = torch.arange(len(label_space), device=prompts.device)

    def per_sample(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Each row's loss, for pooled outputs ``[..., D]`` and dataset class ids ``[...]``."""
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

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Mean loss of pooled outputs ``[B, D]`` for dataset class ids ``labels``."""
        return self.per_sample(output, labels).mean()
