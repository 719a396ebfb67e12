"""The run's random streams, one per key (seed, purpose, round, node, generator), each seeded from
``numpy.random.SeedSequence`` over the whole key: streams of different keys are independent by
construction. (Seeds made by arithmetic, ``base + node + 1 + g``, made node n's generator g share
its stream with node n+1's generator g-1 and adapter.)"""

from enum import IntEnum

import numpy as np
import torch


class Purpose(IntEnum):
    """What a stream drives; its code is the key's second entry."""

    adapter_training = 1  # a client's adapter: minibatch order and dropout masks
    generator_training = 2  # one generator of a node: shuffles, latent noise, input jitter
    synthetic_samples = 3  # a node's draws from its generators (or the server's, from them)
    server_generator_training = 4  # one of the server's generators
    server_synthetic_samples = 5  # the server's draws from its generators
    server_adapter_training = 6  # the server's adapter trainings; ``generator``: which one
    server_curation = 7  # balancing the synthetic pool
    server_distillation = 8  # distilling client adapters into the global adapter
    personal_training = 9  # a node's personal adapter (Ditto): minibatches and dropout masks
    fedgen_batches = 10  # the generated batches FedGen hands one client for a round
    fedgen_training = 11  # the server's FedGen generator: labels and noise
    privacy_audit = 12  # a node's members and non-members in a membership-inference audit
    dp_sgd = 13  # a client's DP-SGD: Poisson sampling (generator 0) and noise (generator 1)
    client_dp = 14  # the noise of a round's client-level DP-FedAvg aggregate


def stream_seed(seed: int, *, round_: int, node: int, generator: int, purpose: Purpose) -> int:
    """A 63-bit seed for the key: ``SeedSequence([seed, purpose, round_, node, generator])``'s
    first 64-bit word, halved so that it fits a signed 64-bit integer."""
    key = [seed, int(purpose), round_, node, generator]
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


def stream(seed: int, *, round_: int, node: int, generator: int, purpose: Purpose,
           device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` on ``device`` for the key. torch seeds its CPU generator (MT19937)
    from the low 32 bits of a seed only, where 50,000 streams would collide with odds of about
    one in four, so on the CPU the key's SeedSequence fills the whole 624-word MT19937 state
    (as numpy's MT19937 does); other devices' generators (Philox) take the 63-bit seed."""
    rng = torch.Generator(device=device)
    if rng.device.type != "cpu":
        return rng.manual_seed(stream_seed(seed, round_=round_, node=node, generator=generator,
                                           purpose=purpose))
    words = np.random.SeedSequence([seed, int(purpose), round_, node, generator]).generate_state(
        _N + 2, np.uint32)
    rng.set_state(_mt19937_state(words))
    return rng


#: Byte offsets in torch's CPU generator state (``CPUGeneratorImplStateLegacy``): the initial
#: seed (uint64), ``left`` (int32), ``seeded`` (int32), ``next`` (uint64), then the 624 MT19937
#: words (each a uint64).
_LEFT, _NEXT, _WORDS, _N = 8, 16, 24, 624
_FRESH = torch.Generator().manual_seed(0).get_state().numpy()


def _mt19937_state(words: np.ndarray) -> torch.Tensor:
    """A just-seeded CPU generator's state whose initial seed is ``words[:2]`` (63 bits) and
    whose 624 MT19937 words are ``words[2:]``, the first with its top bit set so that the state
    is never all zero (as numpy's MT19937 does); it twists before its first output, as after
    any seeding."""
    state = _FRESH.copy()
    state[:8] = (words[:2].view(np.uint64) >> np.uint64(1)).view(np.uint8)
    mt = words[2:].astype(np.uint64)
    mt[0] |= np.uint64(0x80000000)
    state[_WORDS : _WORDS + 8 * _N] = mt.view(np.uint8)
    state[_LEFT : _LEFT + 4] = np.array([1], dtype=np.int32).view(np.uint8)
    state[_NEXT : _NEXT + 8] = 0
    return torch.from_numpy(state)
