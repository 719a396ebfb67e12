"""The audio-to-text-space adapter and its losses.

The adapter maps an audio token sequence ``[L, Da]`` into the text encoder's space: a per-token MLP
(LayerNorm, GELU, dropout) lifts each token, then ``n_latents`` learned queries attend over the
tokens. One latent gives a pooled vector; more give a token sequence (for diffusion conditioning).
"""

import torch
import torch.nn.functional as F
from torch import nn

from flcore.config import AdapterConfig
from flcore.errors import ConfigError


class AudioAdapter(nn.Module):
    """``[B, L, audio_dim]`` audio tokens to ``[B, n_latents, text_dim]``."""

    def __init__(self, audio_dim: int, text_dim: int, config: AdapterConfig) -> None:
        super().__init__()
        if text_dim % config.num_heads:
            raise ConfigError(f"adapter.num_heads={config.num_heads}: must divide the text "
                              f"embedding size {text_dim}")
        self.token_mlp = nn.Sequential(
            nn.LayerNorm(audio_dim),
            nn.Linear(audio_dim, config.hidden_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.hidden_dim, text_dim),
        )
        self.queries = nn.Parameter(torch.randn(config.n_latents, text_dim) * text_dim**-0.5)
        self.pool = nn.MultiheadAttention(text_dim, config.num_heads, dropout=config.dropout,
                                          batch_first=True)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.token_mlp(tokens)
        queries = self.queries.expand(tokens.shape[0], -1, -1)
        out, _ = self.pool(queries, keys, keys, need_weights=False)
        return out

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """One vector per clip ``[B, text_dim]``: the mean of the latents."""
        return self.forward(tokens).mean(1)


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

    def __call__(self, output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """Loss of pooled outputs ``[B, D]`` for dataset class ids ``labels``."""
        if self.kind == "contrastive":
            logits = F.normalize(output, dim=-1) @ self.space_prompts.T / self.temperature
            return F.cross_entropy(logits, self.position[labels])
        target = self.prompts[labels]
        mse = F.mse_loss(output, target)
        cosine = 1 - F.cosine_similarity(output, target, dim=-1).mean()
        if self.kind == "mse":
            return mse
        if self.kind == "cosine":
            return cosine
        return self.mse_weight * mse + self.cosine_weight * cosine
