"""A checkpoint or adapter named by a Hugging Face hub id ("vec-ai/lychee-rerank-mm") -> a local folder.

A local folder is used as it is, with no network and no huggingface_hub. A hub id is looked up with
huggingface_hub.snapshot_download (an optional dependency, imported here only), which uses the local cache
when the Hub cannot be reached, and only the cache when HF_HUB_OFFLINE=1 (as transformers' from_pretrained does).
Only the files minigmr reads are fetched: JSON, Jinja and safetensors (never a pickled .bin).
"""
import os
import re

HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")  # owner/name, as the Hub spells repository ids
PATTERNS = ["*.json", "*.jinja", "*.safetensors"]


def resolve(name_or_path, revision: str | None = None) -> str | None:
    """The local folder of a checkpoint/adapter given as a folder or a hub id (None stays None). Errors say
    what was looked for: the folder, the cache, or the download."""
    if name_or_path is None:
        return None
    path = os.fspath(name_or_path)
    if os.path.isdir(path):
        return path
    if os.path.exists(path):
        raise ValueError(f"{path}: a file; give a checkpoint folder or a hub id (owner/name)")
    if not HUB_ID.fullmatch(path) or path.startswith((".", "/")):
        raise FileNotFoundError(f"{path}: no such folder (nor a hub id of the form owner/name)")
    try:
        import huggingface_hub
        from huggingface_hub.errors import LocalEntryNotFoundError
    except ImportError:
        raise ImportError(f"{path!r} is not a local folder; to load it from the Hugging Face Hub install "
                          "huggingface_hub (pip install 'minigmr[hub]'), or give a local folder") from None
    offline = huggingface_hub.constants.HF_HUB_OFFLINE  # HF_HUB_OFFLINE=1 or TRANSFORMERS_OFFLINE=1
    try:
        return huggingface_hub.snapshot_download(path, revision=revision, allow_patterns=PATTERNS,
                                                 local_files_only=offline)
    except LocalEntryNotFoundError as e:
        where = huggingface_hub.constants.HF_HUB_CACHE
        why = "HF_HUB_OFFLINE is set" if offline else f"the Hub could not be reached ({str(e).splitlines()[0]})"
        raise FileNotFoundError(f"{path}: not a local folder, not in the Hugging Face cache ({where}), and {why}; "
                                f"download it where there is network (hf download {path}) or give a local "
                                "folder") from None
    except Exception as e:  # repository not found, gated, no permission...
        raise OSError(f"{path}: not a local folder, and the Hub answered: {type(e).__name__}: {e}") from None
