"""Where an adapter's files are: a local folder, or a Hugging Face Hub repo (via huggingface_hub).

Example:
    >>> resolve_file("path/to/adapter", "adapter_config.json")      # local folder
    PosixPath('path/to/adapter/adapter_config.json')
    >>> resolve_file("user/repo", "adapter_config.json", revision="main")  # downloads into the HF cache
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

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
    import huggingface_hub

    path = f"{subfolder}/{filename}" if subfolder else filename
    try:
        cached = huggingface_hub.try_to_load_from_cache(str(source), path, cache_dir=cache_dir, revision=revision)
        if isinstance(cached, str):
            return True
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
    return _download(str(source), filename, revision=revision, subfolder=subfolder, token=token,
                     cache_dir=cache_dir)


def _offline() -> bool:
    from huggingface_hub import constants

    is_offline = getattr(constants, "is_offline_mode", None)
    return bool(is_offline() if is_offline else constants.HF_HUB_OFFLINE)


def _download(repo_id: str, filename: str, **kwargs) -> Path:
    """``hf_hub_download`` with every failure turned into a SourceError that says what to do."""
    import huggingface_hub

    with _hub_errors(repo_id, filename, kwargs.get("revision"), kwargs.get("subfolder")):
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **kwargs))


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

    with _hub_errors(str(source), "the repo's files", revision, None):
        return Path(huggingface_hub.snapshot_download(str(source), revision=revision, token=token,
                                                      cache_dir=cache_dir, ignore_patterns=ignore_patterns))


@contextlib.contextmanager
def _hub_errors(repo_id: str, filename: str, revision: str | None, subfolder: str | None) -> Iterator[None]:
    """Turn every failure of a huggingface_hub download into a SourceError that says what to do."""
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id!r}" + (f" (revision {revision!r})" if revision else "")
    sub = f" in subfolder {subfolder!r}" if subfolder else ""
    try:
        yield
    except hf_errors.HFValidationError as err:
        raise SourceError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({err})") from None
    except hf_errors.GatedRepoError:
        raise SourceError(f"Hub repo {where} is gated: accept its terms on the Hub and log in "
                          "(`hf auth login`) or pass token=...") from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceError(f"Hub repo {where} not found (and there is no local folder of that name), or it is "
                          "private and no valid token was sent: check the id, log in (`hf auth login`) or pass "
                          "token=...") from None
    except hf_errors.RevisionNotFoundError:
        raise SourceError(f"revision {revision!r} not found in Hub repo {repo_id!r}: check the branch, tag or "
                          "commit id") from None
    except hf_errors.LocalEntryNotFoundError:
        if _offline():
            raise SourceError(f"{filename} of {where}{sub} is not in the local Hugging Face cache and "
                              "HF_HUB_OFFLINE is set: go online once (unset HF_HUB_OFFLINE) to download it, or "
                              "pass a local folder") from None
        raise SourceError(f"the Hub could not be reached for {filename} of {where}{sub} and it is not in the "
                          "local cache: check your network connection (and HF_ENDPOINT) and retry") from None
    except hf_errors.EntryNotFoundError:
        kind = " is it a PEFT adapter repo?" if filename.startswith("adapter_") else ""
        raise SourceError(f"{filename} not found in Hub repo {where}{sub}:{kind} Check the id, revision and "
                          "subfolder") from None
    except hf_errors.HfHubHTTPError as err:
        status = getattr(getattr(err, "response", None), "status_code", None)
        if status in (401, 403):
            raise SourceError(f"the Hub refused access to {where} (HTTP {status}): the token is invalid or lacks "
                              "access to this repo; log in again (`hf auth login`) or pass a valid token=...") from None
        first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise SourceError(f"downloading {filename} from {where} failed ({first}): retry later") from None
    except SourceError:
        raise
    except Exception as err:  # noqa: BLE001 - the HTTP client's own errors (requests, httpx) differ by version
        raise SourceError(f"downloading {filename} from {where} failed ({type(err).__name__}: {err}); the "
                          "connection was interrupted or the Hub did not answer: check your network "
                          "connection and retry") from err
