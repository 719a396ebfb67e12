"""Where model weights come from: a local folder or the local Hugging Face cache, never the net."""

import hashlib
import re
from pathlib import Path

from flcore.errors import ConfigError

REPO_ID = re.compile(r"[\w.-]+/[\w.-]+")
"""What a Hugging Face model id looks like (``owner/name``)."""


def local_model_dir(path: str | None, model_id: str, key: str,
                    pipelines_allowed: bool = False) -> Path:
    """The folder holding ``model_id``'s weights; a clear error that says how to get them if absent.

    ``key`` is the config prefix (``audio_encoder`` or ``text_encoder``) named in the error;
    ``pipelines_allowed`` also accepts a diffusers pipeline folder (``model_index.json``), and a
    ``path`` that is a model id rather than a folder (as ``images.path`` may be).
    """
    if pipelines_allowed and path is not None and not Path(path).expanduser().exists() \
            and REPO_ID.fullmatch(path):
        path, model_id = None, path
    if path is not None:
        folder = Path(path).expanduser()
        pipeline = pipelines_allowed and (folder / "model_index.json").is_file()
        if not pipeline and not (folder / "config.json").is_file():
            raise ConfigError(
                f"{key}.path={folder}: no config.json there; it must be a model folder saved with "
                f"save_pretrained (on a machine with internet: `hf download {model_id} "
                f"--local-dir {folder}`)")
        return folder
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return Path(snapshot_download(model_id, local_files_only=True))
    except (LocalEntryNotFoundError, OSError, ValueError) as err:
        raise ConfigError(
            f"{key}.model_id={model_id}: weights not in the local Hugging Face cache and "
            f"nothing is downloaded at run time; on a machine with internet run `hf download "
            f"{model_id}` (then copy ~/.cache/huggingface here) or save the model to a folder "
            f"and pass {key}.path=/that/folder") from err


def weights_digest(folder: Path) -> str:
    """Names and sizes of a model folder's weight and config files (cheap; tracks the model)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix in {".safetensors", ".bin", ".json"})
    text = "".join(f"{p.relative_to(folder)}:{p.stat().st_size};" for p in files)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
