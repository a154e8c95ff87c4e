"""Where downloads live, and whether the Hugging Face hub can serve a file now.

A download against an unreachable hub retries for ~25 s before it fails, so reachability is asked once, at once.
"""
from __future__ import annotations

import os
from pathlib import Path

from .errors import ConfigError, brief

HUB_PROBE_TIMEOUT_S = 5.0


def cache_dir() -> Path:
    """samsum_tuner's own cache (tokenized splits, the converted SmolLM2, compiled kernels): $SAMSUM_TUNER_CACHE,
    created here so that a path that cannot be a folder is refused by name, not met as an OSError later."""
    path = Path(os.environ.get("SAMSUM_TUNER_CACHE", Path.home() / ".cache" / "samsum_tuner"))
    try:
        path.mkdir(parents=True, exist_ok=True)  # exist_ok still raises where the path is a file
    except OSError as e:
        what = "is a file, not a folder" if path.is_file() else f"cannot be created ({e.strerror or e})"
        raise ConfigError(f"SAMSUM_TUNER_CACHE: {path} {what}") from None
    return path


def check_hub_id(repo_id: str, key: str) -> None:
    """Refuse a name that is neither a folder here nor a hub id ('name' or 'owner/name'): huggingface_hub's
    HFValidationError would otherwise escape as a traceback."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ConfigError(f"{key}: {brief(repo_id)} is neither a local folder nor a valid hub id") from None


def in_hub_cache(repo_id: str, filenames: tuple[str, ...], repo_type: str | None = None,
                 revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

    check_hub_id(repo_id, "data.source" if repo_type == "dataset" else "model.name")
    return all(isinstance(try_to_load_from_cache(repo_id, f, revision=revision, repo_type=repo_type), str)
               for f in filenames)


def hub_problem(repo_id: str, filename: str, offline: bool, repo_type: str | None = None,
                revision: str | None = None) -> str | None:
    """Why the hub cannot serve `filename` of a repository now (None: it can): one request without retries
    (huggingface_hub's fast-fallback mode)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    if offline:
        return "offline mode, and the hub cache has no copy"
    try:
        get_hf_file_metadata(hf_hub_url(repo_id, filename, repo_type=repo_type, revision=revision),
                             timeout=HUB_PROBE_TIMEOUT_S)
    except Exception as e:  # unreachable, timed out, gated, unknown: the download would fail the same way
        first = str(e).strip().splitlines()[0][:160] if str(e).strip() else ""
        return f"{type(e).__name__}: {first}" if first else type(e).__name__
    return None
