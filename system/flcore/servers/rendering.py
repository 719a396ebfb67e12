"""What a rendering round renders: the clips (or synthetic samples) picked per class and node,
and the adapter states that render them (``images.*``)."""

import torch

from flcore.clients.clientA2V import ClientA2V
from flcore.clients.protocol import SharedTensors, StateDict
from flcore.config import Algorithm, Config, ImageSource
from flcore.visual.renderer import RenderSet, pick_per_class

Samples = tuple[torch.Tensor, torch.Tensor]


def render_picks(config: Config, shared: SharedTensors, client: ClientA2V, split: str,
                 received: dict[int, Samples]) -> Samples:
    """Audio tokens and classes of the first ``images.per_class`` clips per class of
    ``client``'s ``split``, or of the synthetic samples it shared (``split=synthetic``)."""
    per_class = config.images.per_class
    if split == "synthetic":
        x, y = received.get(client.node, (shared.tokens[:0], shared.labels[:0]))
        rows = pick_per_class(torch.arange(len(y), device=y.device), y, per_class)
        return x[rows], y[rows]
    rows = pick_per_class(getattr(client, f"{split}_idx"), shared.labels, per_class)
    return shared.tokens[rows], shared.labels[rows]


def render_sets(config: Config, shared: SharedTensors, clients: list[ClientA2V],
                received: dict[int, Samples], global_state: StateDict,
                trained: dict[int, StateDict], stateful: bool) -> list[RenderSet]:
    """The sets to render per split: the global adapter's and, with ``images.nodes``, each
    node's adapter's: its own under a ``stateful`` strategy, else the one it trained this round
    (``trained``)."""
    i, algorithm = config.images, config.federation.algorithm
    own = ({c.node: c.model_state for c in clients}
           if stateful and algorithm is not Algorithm.centralized else trained)
    prompt = i.source is ImageSource.prompt
    own_images = not prompt and (i.nodes or algorithm is Algorithm.local)
    node_states = own if own_images else {}
    global_adapter = None if algorithm is Algorithm.local else global_state
    sets: list[RenderSet] = []
    splits = ["synthetic"] if i.source is ImageSource.synthetic else i.splits
    for split in splits:
        picks = {c.node: render_picks(config, shared, c, split, received) for c in clients}
        picks = {n: p for n, p in picks.items() if len(p[1])}
        if not picks:
            continue
        if global_adapter is not None or prompt:
            tokens, labels, nodes = (torch.cat(parts) for parts in zip(*(
                (x, y, torch.full_like(y, n)) for n, (x, y) in picks.items()), strict=True))
            sets.append(RenderSet("global", split, global_adapter, tokens, labels, nodes))
        sets += [RenderSet(f"node{n}", split, node_states[n], x, y, torch.full_like(y, n))
                 for n, (x, y) in picks.items() if n in node_states]
    return sets
