"""Downloading published weights: official URLs through torch.hub's cache (with its hash check),
model folders through the Hugging Face Hub's cache.

Hub downloads honour ``HF_HUB_OFFLINE`` (cache only), ``HF_ENDPOINT`` (a mirror; read at call
time, so one process can switch), ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_TOKEN``, resume partial
files and show a progress bar. Every failure becomes one error saying what to do: a
``CheckpointError`` (a value error), or ``HubUnreachableError`` (a connection error) when the
host cannot be reached and the cache lacks the files.

Unreachable hosts are found by one short connection probe before any download: huggingface_hub
would otherwise retry for half a minute per repository. The cache still serves what it holds.
"""

from __future__ import annotations

import logging
import os
import socket
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator
from urllib.parse import urlparse

import torch.hub

from .errors import CheckpointError, HubUnreachableError

HUB_PREFIX = "hf-hub:"
_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")  # safetensors first: no pickle, memory-mapped
_OPTIONAL_FILES = ("preprocessor_config.json",)
_PROBE_TIMEOUT = 5.0  # seconds for the probe's TCP connect; a reachable host answers well within it
# A host found unreachable is not probed again for this long (seconds): the other files and mirrors of
# one download fail at once, and a process that outlives a network outage tries again later.
_REMEMBER_UNREACHABLE = 60.0
_unreachable: dict[tuple[str, int], tuple[float, str]] = {}  # (host, port) -> (when, why)


def _connect_target(url: str) -> tuple[str, int] | None:
    """The ``(host, port)`` a request for ``url`` connects to first (its proxy, when one is set);
    None for a URL that needs no network (``file:``)."""
    parts = urlparse(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return None
    proxy = None if urllib.request.proxy_bypass(parts.hostname) else urllib.request.getproxies().get(parts.scheme)
    if proxy:
        parts = urlparse(proxy if "://" in proxy else f"http://{proxy}")
    return parts.hostname or "", parts.port or (443 if parts.scheme == "https" else 80)


def _remember_unreachable(target: tuple[str, int], reason: str) -> None:
    _unreachable[target] = (time.monotonic(), reason)


def unreachable_reason(url: str) -> str | None:
    """Why ``url``'s host cannot be reached now (one TCP connect of at most ``_PROBE_TIMEOUT``
    seconds, or a failure remembered from the last ``_REMEMBER_UNREACHABLE`` seconds); None if it can."""
    target = _connect_target(url)
    if target is None:
        return None
    seen = _unreachable.get(target)
    if seen is not None and time.monotonic() - seen[0] < _REMEMBER_UNREACHABLE:
        return seen[1]
    try:
        socket.create_connection(target, timeout=_PROBE_TIMEOUT).close()
    except OSError as e:
        reason = f"{target[0]}:{target[1]}: {e.strerror or e}"
        _remember_unreachable(target, reason)
        return reason
    _unreachable.pop(target, None)
    return None


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
    reason = unreachable_reason(url)
    if reason is not None:
        raise HubUnreachableError(f"{url} cannot be reached ({reason}) and {filename} is not in the torch.hub cache "
                                  f"({target.parent}): download it once with network access, or pass the file as a "
                                  f"checkpoint")
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


def _hub_endpoint() -> str:
    from huggingface_hub import constants

    return _endpoint() or constants.ENDPOINT


def _hub_file(repo_id: str, filename: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(hf_hub_download(repo_id, filename, revision=revision, endpoint=_endpoint(),
                                library_name="hybridvit"))


@contextmanager
def _quiet_retries() -> Iterator[None]:
    """Without huggingface_hub's warning per retry: the one error that follows says what failed."""
    log = logging.getLogger("huggingface_hub.utils._http")
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def download_hub_folder(repo_id: str, revision: str | None = None) -> Path:
    """The cached snapshot folder of a Hub model repository: ``config.json``, its weights
    (safetensors if published, else ``pytorch_model.bin``) and ``preprocessor_config.json`` if any.

    Offline, or with the Hub unreachable, the cache alone serves (``_cached_folder``).
    """
    from huggingface_hub.errors import EntryNotFoundError

    where = repo_id + (f"@{revision}" if revision else "")
    reason = None if _offline() else unreachable_reason(_hub_endpoint())
    if _offline() or reason is not None:
        return _cached_folder(repo_id, revision, where, reason)
    try:
        with _quiet_retries():
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
        error = _hub_error(e, where)
        if error is None:
            raise
        raise error from e
    raise CheckpointError(f"Hub repository {where} holds none of {', '.join(_WEIGHT_FILES)}")


def _cached_folder(repo_id: str, revision: str | None, where: str, reason: str | None) -> Path:
    """The cached snapshot, read without a request (huggingface_hub's own cache-only download
    still contacts the Hub): ``config.json`` and either weights file, a missing one counting as
    absent, so a cached ``pytorch_model.bin`` still serves."""
    from huggingface_hub import try_to_load_from_cache

    config = try_to_load_from_cache(repo_id, "config.json", revision=revision)
    if isinstance(config, str) and any(isinstance(try_to_load_from_cache(repo_id, name, revision=revision), str)
                                       for name in _WEIGHT_FILES):
        return Path(config).parent
    raise _not_cached(where, reason)


def _not_cached(where: str, reason: str | None) -> Exception:
    """The error for a repository the cache lacks, offline (``reason`` None) or with the Hub unreachable."""
    from huggingface_hub import constants

    cache = constants.HF_HUB_CACHE
    if reason is None:
        return CheckpointError(f"offline (HF_HUB_OFFLINE=1) and {where} is not in the Hub cache ({cache}): download "
                               f"it once with network access, point HF_ENDPOINT at a mirror, or pass a local folder")
    return HubUnreachableError(
        f"the Hugging Face Hub at {_hub_endpoint()} cannot be reached ({reason}) and {where} is not in the Hub cache "
        f"({cache}): download it once with network access (then HF_HUB_OFFLINE=1 uses the cache without trying "
        f"the network), point HF_ENDPOINT at a reachable mirror, or pass a local folder")


def _hub_error(error: Exception, where: str) -> Exception | None:
    """What a huggingface_hub exception from a Hub the probe reached means, and what to do about it."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub import errors as hub

    endpoint = _hub_endpoint()
    if isinstance(error, hub.RevisionNotFoundError):
        return CheckpointError(f"Hub repository {where}: that revision (branch, tag or commit) does not exist")
    if isinstance(error, hub.RepositoryNotFoundError):
        return CheckpointError(f"no Hub repository {where} at {endpoint} (or it is private or gated: log in with "
                               f"`hf auth login` or set HF_TOKEN)")
    # Reached, then failed (TLS, a proxy, errors 5xx) with no copy cached (LocalEntryNotFoundError, a kind of
    # EntryNotFoundError), or a connection broke (huggingface_hub passes those on as they are): remembered,
    # so the next repository fails at once.
    if isinstance(error, (hub.LocalEntryNotFoundError, httpx2.TransportError)):
        reason = f"{type(error).__name__}: {error}" if isinstance(error, httpx2.TransportError) else "its requests failed"
        target = _connect_target(endpoint)
        if target is not None:
            _remember_unreachable(target, reason)
        return _not_cached(where, reason)
    if isinstance(error, hub.EntryNotFoundError):
        return CheckpointError(f"Hub repository {where} is not a model folder: it has no config.json")
    if isinstance(error, (OSError, hub.HfHubHTTPError)):
        return CheckpointError(f"downloading {where} from {endpoint} failed: {error}")
    return None


def download_pretrained(sources: tuple[str, ...]) -> Path:
    """The first of ``sources`` (URLs, ``hf-hub:`` names) that can be fetched: a file or a model folder.

    Later sources are mirrors of the same weights, tried when an earlier one fails (a dead
    link, no network but a cached Hub copy); the error lists why each one failed.
    """
    failures, unreachable = [], False
    for source in sources:
        try:
            if source.startswith(HUB_PREFIX):
                return download_hub_folder(*parse_hub_name(source))
            return download_weights(source)
        except (CheckpointError, HubUnreachableError) as e:
            failures.append(f"  {source}: {e}")
            unreachable |= isinstance(e, HubUnreachableError)
    error = HubUnreachableError if unreachable else CheckpointError  # no network: the mirrors could not help
    raise error("could not get the published weights from any source:\n" + "\n".join(failures))
