"""Downloading published weights through torch.hub's cache, with its hash check."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch.hub

from .errors import CheckpointError


def download_weights(url: str, progress: bool = True) -> Path:
    """Fetch ``url`` into ``<torch hub dir>/checkpoints`` once and return the local file.

    When the file name carries a hash prefix (``name-<sha256 prefix>.pth``, the torch.hub
    convention of the official releases) the download is verified against it.
    """
    filename = os.path.basename(urlparse(url).path)
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None, progress=progress)
    except RuntimeError as e:  # torch.hub raises RuntimeError on a hash mismatch (and deletes the file)
        raise CheckpointError(f"download of {url} failed verification: {e}") from e
    return target
