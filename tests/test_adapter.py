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


@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_zeroes_a_share_p_in_training_scales_survivors_and_is_off_in_eval(
        monkeypatch: pytest.MonkeyPatch, p: float) -> None:
    """Dropout sits after the token MLP's GELU (site 0) and on the attention weights (site 1).
    At each site, in training, the share of activations it zeroes is p within 5 binomial
    standard deviations of its count, survivors are scaled by 1/(1-p), and the forward pass
    uses what it returns; in eval nothing is zeroed and the output is the dropout-free one."""
    from flcore.trainmodel import adapters

    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    original = adapters._dropout

    def spy(x: torch.Tensor, keys: torch.Tensor | None, site: int, rate: float) -> torch.Tensor:
        out = original(x, keys, site, rate)
        seen.append((x.detach().clone(), out.detach().clone()))
        return out

    monkeypatch.setattr(adapters, "_dropout", spy)
    torch.manual_seed(0)
    model = AudioAdapter(64, 32, AdapterConfig(hidden_dim=64, dropout=p))
    plain = AudioAdapter(64, 32, AdapterConfig(hidden_dim=64, dropout=0.0))
    plain.load_state_dict(model.state_dict())
    plain.train()
    x = torch.randn(64, 16, 64)
    model.train()
    trained = model(x)
    assert len(seen) == 2  # the token MLP and the attention weights
    for site, (before, after) in enumerate(seen):
        live = before != 0
        n = int(live.sum())
        assert n > 1000, site
        zeroed = float((after[live] == 0).double().mean())
        tolerance = 5 * (p * (1 - p) / n) ** 0.5
        assert abs(zeroed - p) <= tolerance, (site, zeroed, p, tolerance)
        kept = live & (after != 0)
        torch.testing.assert_close(after[kept], before[kept] / (1 - p))
    # What the sites return is what the forward pass uses: without dropout (same weights) the
    # output differs by far more than rounding.
    reference = plain(x)
    assert (trained - reference).abs().max() > 1e-3

    seen.clear()
    model.eval()
    evaluated = model(x)
    assert len(seen) == 2
    for before, after in seen:
        assert torch.equal(before, after)
    torch.testing.assert_close(evaluated, reference)


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
