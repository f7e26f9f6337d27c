"""Where an adapter's files are: a local folder, or a Hugging Face Hub repo (via huggingface_hub).

Example:
    >>> resolve_file("path/to/adapter", "adapter_config.json")      # local folder
    PosixPath('path/to/adapter/adapter_config.json')
    >>> resolve_file("user/repo", "adapter_config.json", revision="main")  # downloads into the HF cache
"""
from __future__ import annotations

import contextlib
import difflib
import itertools
import os
import re
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from urllib.parse import urlsplit

from .errors import SourceError


def _local_dir(source: str | os.PathLike, subfolder: str | None) -> Path | None:
    root = Path(source).expanduser()
    if not root.is_dir():
        return None
    folder = (root / subfolder) if subfolder else root
    if subfolder and not folder.resolve().is_relative_to(root.resolve()):
        raise SourceError(f"subfolder {subfolder!r} escapes the adapter folder {str(root)!r}")
    return folder


def _check_subfolder(subfolder: str | None) -> None:
    """A subfolder must name a folder inside the repo: relative, no '..' (either slash), no NUL."""
    if subfolder is not None and not isinstance(subfolder, str):
        raise SourceError(f"subfolder must be a string, found {type(subfolder).__name__}")
    if not subfolder:
        return
    posix = PurePosixPath(subfolder.replace("\\", "/"))
    if "\x00" in subfolder or posix.is_absolute() or Path(subfolder).is_absolute() or ".." in posix.parts:
        raise SourceError(f"subfolder {subfolder!r} must be a relative path inside the repo")


def file_exists(
    source: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> bool:
    """Whether ``filename`` exists in the adapter source, without downloading it (a Hub repo is asked
    with a HEAD request, or its local cache when the Hub cannot be reached).

    Example:
        >>> file_exists("user/repo", "adapter_model.bin")
        False
    """
    _check_subfolder(subfolder)
    local = _local_dir(source, subfolder)
    if local is not None:
        return (local / filename).is_file()
    if isinstance(source, os.PathLike):  # a Path names a local folder, never a Hub repo
        return False
    import huggingface_hub

    path = f"{subfolder}/{filename}" if subfolder else filename
    try:
        cached = huggingface_hub.try_to_load_from_cache(str(source), path, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return True
        if _offline() or unreachable_reason() is not None:
            return False
        return bool(huggingface_hub.file_exists(str(source), path, revision=revision, token=token))
    except Exception:  # noqa: BLE001 - offline, unreachable, invalid id, gated...: the file is not available
        return False


def resolve_file(
    source: str | os.PathLike,
    filename: str,
    *,
    revision: str | None = None,
    subfolder: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
) -> Path:
    """Local path of ``filename`` in ``source`` (a folder or a Hub repo id), downloading if needed.

    Every failure is a :class:`SourceError` that says what to do about it.
    """
    _check_subfolder(subfolder)
    local = _local_dir(source, subfolder)
    if local is not None:
        path = local / filename
        if not path.is_file():
            raise SourceError(f"{path}: file not found in the adapter folder")
        return path
    return _download(source, filename, revision=revision, subfolder=subfolder, token=token, cache_dir=cache_dir)


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline else constants.HF_HUB_OFFLINE)


def _download(source: str | os.PathLike, filename: str, **kwargs) -> Path:
    """``hf_hub_download`` with every failure turned into a SourceError that says what to do."""
    import huggingface_hub

    with _hub_errors(source, filename, kwargs.get("revision"), kwargs.get("subfolder")) as cache_only:
        return Path(huggingface_hub.hf_hub_download(str(source), filename, local_files_only=cache_only, **kwargs))


def resolve_folder(
    source: str | os.PathLike,
    *,
    revision: str | None = None,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    ignore_patterns: list[str] | None = None,
) -> Path:
    """``source`` itself when it is a local folder, else the Hub repo's snapshot in the Hugging Face cache
    (files matching ``ignore_patterns`` are not downloaded; fetch them later with ``resolve_file`` and
    ``revision=folder.name``, the snapshot's commit).

    Example:
        >>> resolve_folder("user/model", ignore_patterns=["*.safetensors", "*.bin"])   # config, tokenizer...
    """
    root = Path(source).expanduser()
    if root.is_dir():
        return root
    import huggingface_hub

    with _hub_errors(source, "the repo's files", revision, None) as cache_only:
        return Path(huggingface_hub.snapshot_download(str(source), revision=revision, token=token,
                                                      cache_dir=cache_dir, ignore_patterns=ignore_patterns,
                                                      local_files_only=cache_only))


ID_RULE = "a Hub repo id is 'name' or 'owner/name': letters, digits, '-', '_' and '.'"


def local_hint(source: str | os.PathLike) -> str:
    """What the disk says about a ``source`` that is not a local folder, for error messages: "no local
    folder 'x' (cwd /here; did you mean 'y'?)", or that ``source`` is a file.

    Example:
        >>> local_hint("llama/adaptr")
        "no local folder 'llama/adaptr' (cwd /home/me; did you mean 'llama/adapter'?)"
    """
    path = Path(source).expanduser()
    if path.exists():
        return f"{str(source)!r} is a file, not a folder (pass the folder that holds it)"
    notes = []
    if not path.is_absolute():
        with contextlib.suppress(OSError):
            notes.append(f"cwd {Path.cwd()}")
    guess = _close_folder(path)
    if guess:
        notes.append(f"did you mean {guess!r}?")
    return f"no local folder {str(source)!r}" + (f" ({'; '.join(notes)})" if notes else "")


def _close_folder(path: Path) -> str | None:
    """An existing folder spelt like ``path`` but for one component (difflib's close match), or None."""
    base = Path(path.anchor) if path.is_absolute() else Path(".")
    parts = path.parts[1:] if path.is_absolute() else path.parts
    for i, part in enumerate(parts):
        if (base / part).is_dir():
            base = base / part
            continue
        try:
            with os.scandir(base) as entries:
                names = [e.name for e in itertools.islice(entries, 5000) if e.is_dir()]
        except OSError:
            return None
        match = difflib.get_close_matches(part, names, n=1, cutoff=0.75)
        guess = base.joinpath(match[0], *parts[i + 1:]) if match else None
        return str(guess) if guess is not None and guess.is_dir() else None
    return None


def _check_repo_id(source: str | os.PathLike) -> None:
    """A source that cannot be a Hub repo id (a Path object, an absolute or ``./`` path, ...) is a missing
    local folder: say so now, without asking the Hub."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if isinstance(source, os.PathLike):
        raise SourceError(local_hint(source))
    try:
        validate_repo_id(source)
    except HFValidationError:
        if Path(source).expanduser().exists():
            raise SourceError(local_hint(source)) from None
        raise SourceError(f"{source!r} is neither a local folder nor a valid Hub repo id ({ID_RULE}): "
                          f"{local_hint(source)}") from None


def unreachable_reason() -> str | None:
    """Why the Hub (``HF_ENDPOINT``) cannot be reached, or None when it answers at all: one HEAD request
    (timeout ``HF_HUB_ETAG_TIMEOUT``) before a download. When it cannot, jlora reads the local cache only
    instead of sitting through huggingface_hub's retries (~25 s).

    Example:
        >>> unreachable_reason()
        "cannot resolve huggingface.co"
    """
    from huggingface_hub import constants

    return _probe(constants.ENDPOINT, float(constants.HF_HUB_ETAG_TIMEOUT))


def _probe(endpoint: str, timeout: float) -> str | None:
    """One HEAD request to ``endpoint`` through huggingface_hub's own HTTP session (its proxies, certificates
    and client factory): None if anything answers, else why not in a few words."""
    from huggingface_hub.utils import get_session

    try:
        get_session().head(endpoint, timeout=timeout)
    except Exception as err:  # noqa: BLE001 - requests' or httpx's errors, by huggingface_hub version
        host = urlsplit(endpoint).hostname or endpoint
        text = f"{type(err).__name__}: {err}"
        for pattern, why in ((r"(?i)proxy", f"proxy error ({text[:160]})"),
                             (r"(?i)resolve|name or service not known|nodename nor servname|getaddrinfo|"
                              r"name resolution", f"cannot resolve {host}"),
                             (r"(?i)refused", f"connection to {host} refused"),
                             (r"(?i)timed? ?out", f"no answer from {host} within {timeout:g} s"),
                             (r"(?i)ssl|certificate", f"TLS error ({text[:160]})")):
            if re.search(pattern, text):
                return why
        return text.splitlines()[0][:200]
    return None


@contextlib.contextmanager
def _hub_errors(source: str | os.PathLike, filename: str, revision: str | None,
                subfolder: str | None) -> Iterator[bool]:
    """Turn every failure of a huggingface_hub download into a SourceError that says what to do. Yields
    whether to read the local cache only (offline, or the Hub cannot be reached: no retry loop)."""
    _check_repo_id(source)
    why = None if _offline() else unreachable_reason()
    try:
        yield why is not None
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 - the HTTP client's own errors (requests, httpx) differ by version
        message, chain = _hub_failure(err, str(source), filename, revision, subfolder, why)
        raise SourceError(message) from (err if chain else None)


def _hub_failure(err: Exception, repo_id: str, filename: str, revision: str | None, subfolder: str | None,
                 why: str | None) -> tuple[str, bool]:
    """The message for a failed Hub download, and whether to chain ``err`` to it."""
    from huggingface_hub import constants
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    sub = f" in subfolder {subfolder!r}" if subfolder else ""
    if isinstance(err, hf_errors.HFValidationError):
        return (f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({ID_RULE}): "
                f"{local_hint(repo_id)}"), False
    if isinstance(err, hf_errors.GatedRepoError):
        return (f"Hub repo {where} is gated: accept its terms on the Hub and log in (`hf auth login`) or pass "
                "token=..."), False
    if isinstance(err, hf_errors.RepositoryNotFoundError):
        return (f"{local_hint(repo_id)}, and Hub repo {where} was not found, or it is private and no valid token "
                "was sent: check the id and the path, log in (`hf auth login`) or pass token=..."), False
    if isinstance(err, hf_errors.RevisionNotFoundError):
        return f"revision {revision!r} not found in Hub repo {repo_id!r}: check the branch, tag or commit id", False
    if isinstance(err, hf_errors.LocalEntryNotFoundError):
        if _offline():
            return (f"{local_hint(repo_id)}, and {filename} of Hub repo {where}{sub} is not in the local Hugging "
                    "Face cache while HF_HUB_OFFLINE is set: go online once (unset HF_HUB_OFFLINE) to download "
                    "it, or pass a local folder"), False
        return (f"{local_hint(repo_id)}, and the Hub ({constants.ENDPOINT}) could not be reached"
                f"{f' ({why})' if why else ''} for {filename} of {where}{sub}, which is not in the local cache "
                "either: check the path, or your network connection (and HF_ENDPOINT) and retry"), False
    if isinstance(err, hf_errors.EntryNotFoundError):
        kind = " is it a PEFT adapter repo?" if filename.startswith("adapter_") else ""
        return f"{filename} not found in Hub repo {where}{sub}:{kind} Check the id, revision and subfolder", False
    if isinstance(err, hf_errors.HfHubHTTPError):
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            return (f"the Hub refused access to {where} (HTTP {status}): the token is invalid or lacks access to "
                    "this repo; log in again (`hf auth login`) or pass a valid token=..."), False
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        return f"downloading {filename} from {where} failed ({first}): retry later", False
    return (f"downloading {filename} from {where} failed ({type(err).__name__}: {err}); the connection was "
            "interrupted or the Hub did not answer: check your network connection and retry"), True
