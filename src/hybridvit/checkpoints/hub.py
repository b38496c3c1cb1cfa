"""Downloading published weights: official URLs through torch.hub's cache (with its hash check),
model folders through the Hugging Face Hub's cache.

Hub downloads honour ``HF_HUB_OFFLINE`` (cache only), ``HF_ENDPOINT`` (a mirror; read at call
time, so one process can switch), ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_TOKEN``, resume partial
files and show a progress bar. Every failure becomes one ``CheckpointError`` saying what to do.
"""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import urlparse

import torch.hub

from .errors import CheckpointError

HUB_PREFIX = "hf-hub:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # safetensors first: no pickle, memory-mapped
_OPTIONAL_FILES = ("preprocessor_config.json",)


def download_weights(url: str, progress: bool = True) -> Path:
    """Fetch ``url`` into ``<torch hub dir>/checkpoints`` once and return the local file.

    When the file name carries a hash prefix (``name-<sha256 prefix>.pth``, the torch.hub
    convention of the official releases) the download is verified against it. Offline
    (``HF_HUB_OFFLINE=1``) only an already cached file is returned.
    """
    filename = os.path.basename(urlparse(url).path)
    target = Path(torch.hub.get_dir()) / "checkpoints" / filename
    if target.exists():
        return target
    if _offline():
        raise CheckpointError(f"offline (HF_HUB_OFFLINE=1) and {filename} is not in the torch.hub cache ({target.parent})")
    target.parent.mkdir(parents=True, exist_ok=True)
    match = torch.hub.HASH_REGEX.search(filename)
    try:
        torch.hub.download_url_to_file(url, str(target), hash_prefix=match.group(1) if match else None, progress=progress)
    except RuntimeError as e:  # torch.hub raises RuntimeError on a hash mismatch (and deletes the file)
        raise CheckpointError(f"download of {url} failed verification: {e}") from e
    except OSError as e:  # URLError and socket errors
        raise CheckpointError(f"could not download {url}: {e}") from e
    return target


def parse_hub_name(name: str) -> tuple[str, str | None]:
    """``"hf-hub:ORG/NAME[@REVISION]"`` -> ``(repo_id, revision)``."""
    spec = name.removeprefix(HUB_PREFIX)
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"expected {HUB_PREFIX}ORG/NAME[@REVISION], got {name!r}")
    return repo_id, revision or None


def _offline() -> bool:
    from huggingface_hub import constants

    return constants.is_offline_mode()


def _endpoint() -> str | None:
    return os.environ.get("HF_ENDPOINT") or None


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=_endpoint(),
                                library_name="hybridvit"))


def download_hub_folder(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of a Hub model repository: ``config.json``, its weights
    (safetensors if published, else ``pytorch_model.bin``) and ``preprocessor_config.json`` if any.

    Offline, a file missing from the cache counts as absent, so a cached ``pytorch_model.bin``
    still serves; with no weights cached at all the error says the cache lacks them.
    """
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    where = repo_id + (f"@{revision}" if revision else "")
    try:
        config = _hub_file(repo_id, "config.json", revision)
        for name in _OPTIONAL_FILES:
            try:
                _hub_file(repo_id, name, revision)
            except EntryNotFoundError:
                pass
        for name in _WEIGHT_FILES:
            try:
                _hub_file(repo_id, name, revision)
                return config.parent
            except EntryNotFoundError:
                continue
    except Exception as e:
        message = _explain(e, where)
        if message is None:
            raise
        raise CheckpointError(message) from e
    if _offline():
        raise CheckpointError(_explain(LocalEntryNotFoundError(where), where))
    raise CheckpointError(f"Hub repository {where} holds none of {', '.join(_WEIGHT_FILES)}")


def _explain(error: Exception, where: str) -> str | None:
    """What a huggingface_hub exception means for the user and what to do about it."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hub

    endpoint = _endpoint() or constants.ENDPOINT
    if isinstance(error, hub.RevisionNotFoundError):
        return f"Hub repository {where}: that revision (branch, tag or commit) does not exist"
    if isinstance(error, hub.RepositoryNotFoundError):
        return f"no Hub repository {where} at {endpoint} (or it is private or gated: log in with `hf auth login` or set HF_TOKEN)"
    if isinstance(error, hub.LocalEntryNotFoundError) or _offline():  # (a kind of EntryNotFoundError)
        state = "offline (HF_HUB_OFFLINE=1)" if _offline() else f"the Hub ({endpoint}) is unreachable"
        return (f"{state} and {where} is not in the Hub cache ({constants.HF_HUB_CACHE}): download it once with "
                f"network access, point HF_ENDPOINT at a mirror, or pass a local folder")
    if isinstance(error, hub.EntryNotFoundError):
        return f"Hub repository {where} is not a model folder: it has no config.json"
    if isinstance(error, (OSError, hub.HfHubHTTPError)):
        return f"downloading {where} from {endpoint} failed: {error}"
    return None


def download_pretrained(sources: tuple[str, ...]) -> Path:
    """The first of ``sources`` (URLs, ``hf-hub:`` names) that can be fetched: a file or a model folder.

    Later sources are mirrors of the same weights, tried when an earlier one fails (a dead
    link, no network but a cached Hub copy); the error lists why each one failed.
    """
    failures = []
    for source in sources:
        try:
            if source.startswith(HUB_PREFIX):
                return download_hub_folder(*parse_hub_name(source))
            return download_weights(source)
        except CheckpointError as e:
            failures.append(f"  {source}: {e}")
    raise CheckpointError("could not get the published weights from any source:\n" + "\n".join(failures))
