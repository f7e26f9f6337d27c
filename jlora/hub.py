"""Where an adapter's files are: a local folder, or a Hugging Face Hub repo (via huggingface_hub).

Example:
    >>> resolve_file("path/to/adapter", "adapter_config.json")      # local folder
    PosixPath('path/to/adapter/adapter_config.json')
    >>> resolve_file("user/repo", "adapter_config.json", revision="main")  # downloads into the HF cache
"""
from __future__ import annotations

import os
from pathlib import Path

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
    if subfolder and (Path(subfolder).is_absolute() or ".." in Path(subfolder).parts):
        raise SourceError(f"subfolder {subfolder!r} must be a relative path inside the repo")


def file_exists(source: str | os.PathLike, filename: str, **hub_kwargs) -> bool:
    """Whether ``filename`` exists in the adapter source (no download for local folders)."""
    try:
        resolve_file(source, filename, **hub_kwargs)
        return True
    except SourceError:
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


def _download(repo_id: str, filename: str, **kwargs) -> Path:
    import huggingface_hub
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id!r}" + (f" (revision {kwargs['revision']!r})" if kwargs.get("revision") else "")
    try:
        return Path(huggingface_hub.hf_hub_download(repo_id, filename, **kwargs))
    except hf_errors.HFValidationError as err:
        raise SourceError(f"{repo_id!r} is neither a local folder nor a valid Hub repo id ({err})") from None
    except hf_errors.GatedRepoError:
        raise SourceError(f"Hub repo {where} is gated: accept its terms on the Hub and log in "
                          "(`hf auth login`) or pass token=...") from None
    except hf_errors.RepositoryNotFoundError:
        raise SourceError(f"Hub repo {where} not found, or private without a valid token: check the id, "
                          "log in (`hf auth login`) or pass token=...") from None
    except hf_errors.RevisionNotFoundError:
        raise SourceError(f"revision {kwargs.get('revision')!r} not found in Hub repo {repo_id!r}") from None
    except hf_errors.LocalEntryNotFoundError:
        raise SourceError(f"{filename} of {where} is not in the local cache and the Hub cannot be reached "
                          "(offline?): go online once, or unset HF_HUB_OFFLINE") from None
    except hf_errors.EntryNotFoundError:
        sub = f" in subfolder {kwargs['subfolder']!r}" if kwargs.get("subfolder") else ""
        raise SourceError(f"{filename} not found in Hub repo {where}{sub}: is it a PEFT adapter repo?") from None
    except hf_errors.HfHubHTTPError as err:
        raise SourceError(f"downloading {filename} from {where} failed: {err}") from None
    except OSError as err:  # network errors, truncated downloads, disk errors
        raise SourceError(f"downloading {filename} from {where} failed: {err}") from None
