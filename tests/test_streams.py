"""The run's random streams: one per (seed, purpose, round, node, generator), none shared."""

import itertools

import pytest
import torch

from flcore.clients.training import training_seed
from flcore.streams import Purpose, stream, stream_seed


def test_no_two_streams_coincide_over_a_large_federation() -> None:
    """1000 nodes x 50 generators: every generator stream's first draw is its own, and no seed
    is shared across purposes (100 nodes x 50 generators x every purpose). The old arithmetic
    ``base + node + 1 + g`` gave node n's generator g the stream of node n+1's generator g-1
    and of node n+1's adapter."""
    draws = torch.stack([
        torch.randint(2**62, (1,), generator=stream(0, round_=3, node=n, generator=g,
                                                   purpose=Purpose.generator_training))[0]
        for n, g in itertools.product(range(1000), range(50))])
    assert len(draws.unique()) == len(draws) == 50_000
    seeds = {stream_seed(0, round_=3, node=n, generator=g, purpose=p)
             for p, n, g in itertools.product(Purpose, range(100), range(50))}
    assert len(seeds) == len(Purpose) * 100 * 50
    assert all(0 <= s < 2**63 for s in seeds)
    adapters = [training_seed(0, 3, n) for n in range(1000)]
    assert len(set(adapters)) == 1000 and set(adapters[:100]) <= seeds


def test_the_same_key_gives_the_same_stream_and_any_other_key_another() -> None:
    key = {"round_": 4, "node": 7, "generator": 2, "purpose": Purpose.generator_training}
    first = torch.randn(5, generator=stream(11, **key))
    torch.testing.assert_close(torch.randn(5, generator=stream(11, **key)), first)
    assert training_seed(11, 4, 7) == training_seed(11, 4, 7)
    others = [stream(12, **key)] + [
        stream(11, **{**key, name: value})
        for name, value in (("round_", 5), ("node", 8), ("generator", 1),
                            ("purpose", Purpose.synthetic_samples))]
    for other in others:
        assert not torch.allclose(torch.randn(5, generator=other), first)


def test_a_cpu_stream_uses_the_whole_key_not_32_bits_of_a_seed() -> None:
    """torch seeds its CPU generator from a seed's low 32 bits (``s`` and ``s + 2**32`` give
    one stream), so a CPU stream's MT19937 state is filled from the key's SeedSequence; its
    ``initial_seed`` is the key's 63-bit :func:`stream_seed`."""
    same = [torch.randn(3, generator=torch.Generator().manual_seed(s)) for s in (5, 5 + 2**32)]
    torch.testing.assert_close(*same)
    key = {"round_": 1, "node": 2, "generator": 3, "purpose": Purpose.generator_training}
    rng = stream(0, **key)
    assert rng.initial_seed() == stream_seed(0, **key)
    plain = torch.Generator().manual_seed(stream_seed(0, **key))
    assert not torch.allclose(torch.randn(3, generator=rng), torch.randn(3, generator=plain))


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_a_stream_lives_on_the_requested_device(device: str) -> None:
    rng = stream(0, round_=1, node=0, generator=0, purpose=Purpose.generator_training,
                 device=device)
    assert rng.device.type == device
