"""Where downloads live, and whether the Hugging Face hub can serve a file now.

A download against an unreachable hub retries for ~25 s before it fails, so reachability is asked once, at once.
"""
from __future__ import annotations

import os
from pathlib import Path

HUB_PROBE_TIMEOUT_S = 5.0


def cache_dir() -> Path:
    """samsum_tuner's own cache (tokenized splits, the converted SmolLM2, compiled kernels): $SAMSUM_TUNER_CACHE."""
    return Path(os.environ.get("SAMSUM_TUNER_CACHE", Path.home() / ".cache" / "samsum_tuner"))


def in_hub_cache(repo_id: str, filenames: tuple[str, ...], repo_type: str | None = None,
                 revision: str | None = None) -> bool:
    from huggingface_hub import try_to_load_from_cache

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
