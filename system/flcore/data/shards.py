"""The audio embedding shards' contents and their checks: a shard carries a checksum.

A shard (``<cache_dir>/<key>/shard-00000.pt``) holds a slice of the audio tokens, the names of
its clips and ``sha256``: the hash of the tokens (dtype, shape, bytes) and the names.
``torch.load`` does not check a file's bytes, so a bit flipped on disk in a tensor loads silently
and finite; the checksum catches it, and a shard whose contents do not match it (or that has
none) is a warning naming the file and is recomputed.
"""

import hashlib
from typing import Any

import torch

SHARD_FORMAT = 2  # 2: shards carry sha256; format-1 entries (none) have another key: recomputed


def tensor_problem(value: Any, shape: tuple[int | None, ...]) -> str | None:
    """Why ``value`` is not a finite float tensor of ``shape`` (None: any size), or None."""
    if not isinstance(value, torch.Tensor) or not value.is_floating_point():
        return f"not a float tensor ({type(value).__name__})"
    if value.ndim != len(shape) or any(n not in (None, m)
                                       for n, m in zip(shape, value.shape, strict=True)):
        wanted = ", ".join("*" if n is None else str(n) for n in shape)
        return f"shape {list(value.shape)}, expected [{wanted}]"
    if not torch.isfinite(value).all():
        return "NaN/inf values"
    return None


def shard_digest(tokens: torch.Tensor, filenames: list[str]) -> str:
    """sha256 of a shard's tokens (dtype, shape and bytes) and clip names."""
    digest = hashlib.sha256(f"{tokens.dtype}\0{list(tokens.shape)}\0".encode())
    digest.update(tokens.detach().cpu().contiguous().flatten().view(torch.uint8).numpy())
    digest.update("\0".join(filenames).encode())
    return digest.hexdigest()


def shard_payload(tokens: torch.Tensor, filenames: list[str]) -> dict[str, Any]:
    """What a shard file stores: the tokens, its clips' names and their checksum."""
    return {"tokens": tokens, "filenames": filenames, "sha256": shard_digest(tokens, filenames)}


def checksum_problem(entry: dict[str, Any]) -> str | None:
    """Why a loaded shard's stored sha256 does not vouch for its tokens and names, or None;
    call it once ``tokens`` is known to be a float tensor and ``filenames`` the shard's clips."""
    stored = entry.get("sha256")
    if not isinstance(stored, str):
        return "no checksum (written before shards carried one)"
    actual = shard_digest(entry["tokens"], entry["filenames"])
    if actual != stored:
        return f"checksum mismatch: stored sha256 {stored[:12]}..., contents {actual[:12]}..."
    return None
