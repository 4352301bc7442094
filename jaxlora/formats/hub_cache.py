"""Hugging Face Hub ids resolved to the local cache (no download).

``--model=Qwen/Qwen2.5-7B-Instruct`` and ``--lora_modules=sql=acme/sql-lora`` name what
``huggingface-cli download`` (or transformers, or vLLM) already put in the cache: the snapshot
directory of the repository's ``main`` ref, as ``huggingface_hub`` lays it out::

    $HF_HUB_CACHE (else $HF_HOME/hub, else ~/.cache/huggingface/hub)
        models--Qwen--Qwen2.5-7B-Instruct/
            refs/main                 the commit the main branch pointed at
            snapshots/<commit>/       config.json, *.safetensors, tokenizer.json, ... (links)

jaxlora never downloads: an id that is not in the cache is an error naming the cache and the
command that fills it.
"""

from __future__ import annotations

import os
import re

# owner/name, as the Hub spells repository ids
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def hub_cache_dir() -> str:
    """Where huggingface_hub keeps its cache (its own environment variables, in its order)."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.path.expanduser(os.environ["HF_HUB_CACHE"])
    home = os.environ.get("HF_HOME") or os.path.join("~", ".cache", "huggingface")
    return os.path.join(os.path.expanduser(home), "hub")


def is_repo_id(text: str) -> bool:
    """Whether text is spelled as a Hub id (owner/name) and names no existing path."""
    return bool(_REPO_ID.match(text)) and not os.path.exists(text)


def snapshot_dir(repo_id: str, *, cache_dir: str | None = None) -> str | None:
    """The cached snapshot of repo_id's main ref (or its only snapshot when the cache holds no
    refs/main, as a copied cache may); None when the cache does not hold the repository."""
    if not _REPO_ID.match(repo_id):
        return None
    root = os.path.join(cache_dir or hub_cache_dir(), "models--" + repo_id.replace("/", "--"))
    snapshots = os.path.join(root, "snapshots")
    ref = os.path.join(root, "refs", "main")
    if os.path.isfile(ref):
        with open(ref) as f:
            commit = f.read().strip()
        path = os.path.join(snapshots, commit)
        return path if commit and os.path.isdir(path) else None
    try:
        found = [e.path for e in os.scandir(snapshots) if e.is_dir()]
    except OSError:
        return None
    return found[0] if len(found) == 1 else None


def resolve_local(path: str | os.PathLike) -> str:
    """path itself when it exists (or is no Hub id), else the cached snapshot of the Hub id it
    names, else path (whose own check then reports it missing, see ``not_cached``)."""
    path = os.fspath(path)
    if os.path.exists(path) or not _REPO_ID.match(path):
        return path
    return snapshot_dir(path) or path


def not_cached(repo_id: str) -> str:
    """The words for an id the cache does not hold."""
    return (
        f"not in the Hugging Face cache ({hub_cache_dir()}; jaxlora does not download: "
        f"`huggingface-cli download {repo_id}` fills it)"
    )
