"""The adapter's shapes, its dropout, and the losses against their formulas."""

import pytest
import torch
import torch.nn.functional as F

from flcore.config import AdapterConfig
from flcore.errors import ConfigError
from flcore.trainmodel.adapters import AdapterLoss, AudioAdapter


def test_shapes_for_one_and_many_latents() -> None:
    x = torch.randn(5, 8, 64)
    one = AudioAdapter(64, 32, AdapterConfig(hidden_dim=16, n_latents=1, num_heads=4))
    many = AudioAdapter(64, 32, AdapterConfig(hidden_dim=16, n_latents=3, num_heads=4))
    assert one(x).shape == (5, 1, 32) and one.embed(x).shape == (5, 32)
    many.eval()
    assert many(x).shape == (5, 3, 32)
    torch.testing.assert_close(many.embed(x), many(x).mean(1))


def test_dropout_is_applied_in_training_only() -> None:
    model = AudioAdapter(64, 32, AdapterConfig(hidden_dim=16, dropout=0.5))
    x = torch.randn(4, 8, 64)
    model.train()
    assert not torch.allclose(model(x), model(x))
    model.eval()
    torch.testing.assert_close(model(x), model(x))


def test_heads_must_divide_the_text_size() -> None:
    with pytest.raises(ConfigError, match=r"adapter\.num_heads=5: must divide the text"):
        AudioAdapter(64, 32, AdapterConfig(num_heads=5))


def test_losses_match_their_formulas() -> None:
    torch.manual_seed(0)
    prompts = torch.randn(6, 4)
    space = torch.tensor([1, 3, 4])
    out, labels = torch.randn(5, 4), torch.tensor([1, 3, 4, 4, 1])
    target = prompts[labels]
    mse = F.mse_loss(out, target)
    cos = 1 - F.cosine_similarity(out, target).mean()
    for kind, expected in [("mse", mse), ("cosine", cos), ("mse+cosine", 2 * mse + 0.5 * cos)]:
        loss = AdapterLoss(AdapterConfig(loss=kind, mse_weight=2.0, cosine_weight=0.5),
                           prompts, space)
        torch.testing.assert_close(loss(out, labels), expected)
    logits = F.normalize(out, dim=-1) @ F.normalize(prompts[space], dim=-1).T / 0.1
    expected = F.cross_entropy(logits, torch.tensor([0, 1, 2, 2, 0]))
    loss = AdapterLoss(AdapterConfig(loss="contrastive", temperature=0.1), prompts, space)
    torch.testing.assert_close(loss(out, labels), expected)
