"""Loading of meta-weights that every family shares: strict key/shape/value checks and the
resolution of a local directory or a Hugging Face Hub repo id (offline-aware)."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_strict(module: nn.Module, tensors: Mapping[str, torch.Tensor], what: str) -> None:
    """Loads ``tensors`` into ``module`` after checking keys, shapes and values exactly.

    A missing, extra or wrongly shaped key, or a non-finite value, raises a ValueError that
    starts with ``what`` and lists every problem.
    """
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = sorted(
        f"{k}: {tuple(tensors[k].shape)} (expected {expected[k]})"
        for k in set(expected) & set(tensors)
        if tuple(tensors[k].shape) != expected[k]
    )
    if missing or extra or wrong:
        parts = []
        if missing:
            parts.append(f"missing keys {missing}")
        if extra:
            parts.append(f"unexpected keys {extra}")
        if wrong:
            parts.append(f"wrong shapes {wrong}")
        raise ValueError(f"{what}: " + "; ".join(parts))
    for k, v in tensors.items():
        if not v.is_floating_point() or not torch.isfinite(v).all():
            raise ValueError(f"{what}: {k} must be finite floats")
    module.load_state_dict({k: v.float() for k, v in tensors.items()}, strict=True)




def resolve_directory(source: str, *, revision=None, cache_dir=None, token=None,
                       force_download=False, local_files_only=False) -> Path:
    """A local checkpoint directory, or the cache directory of a Hub repo's config + weights."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise ValueError(f"pretrained={source!r} is a file; expected a checkpoint directory or a Hub repo id")
    if not REPO_ID.match(source):
        raise FileNotFoundError(
            f"pretrained={source!r} is neither an existing directory nor a Hugging Face repo id (owner/name)"
        )
    from huggingface_hub import hf_hub_download

    files = {}
    for name in ("config.json", "model.safetensors"):
        try:
            files[name] = hf_hub_download(
                repo_id=source, filename=name, revision=revision, cache_dir=cache_dir,
                token=token, force_download=force_download, local_files_only=local_files_only,
            )
        except Exception as e:  # huggingface_hub raises several types; all mean "not available"
            from huggingface_hub import constants

            offline = bool(constants.HF_HUB_OFFLINE)
            hint = (
                " HF_HUB_OFFLINE is set and the file is not in the local cache"
                if offline or local_files_only
                else " Check the repo id and your network; once downloaded, it also loads offline from the cache"
            )
            raise OSError(
                f"could not get {name} of the Hugging Face repo {source!r} ({type(e).__name__}: {e}).{hint}"
            ) from e
    directory = Path(files["config.json"]).parent
    if Path(files["model.safetensors"]).parent != directory:
        raise OSError(f"Hub files of {source!r} resolved to different directories")
    return directory


class ReadableSaves:
    """Mixed in before ``PyTorchModelHubMixin``: ``save_pretrained`` leaves model.safetensors
    readable like the checkpoint's other files."""

    def _save_pretrained(self, save_directory: Path) -> None:
        super()._save_pretrained(save_directory)
        readable_like_other_files(Path(save_directory) / "model.safetensors")


def readable_like_other_files(path: Path) -> None:
    """Gives ``path`` the mode a newly created file gets under the process's umask (safetensors
    writes its files 0600, unlike every other file of a checkpoint directory)."""
    import os

    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, 0o666 & ~mask)
