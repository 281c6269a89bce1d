"""Loading tiktoken encodings without the network.

tiktoken downloads an encoding file on first use and caches it under
TIKTOKEN_CACHE_DIR, named by the SHA-1 of its URL. We seed that cache from the
gzipped copies the installed `bpe-openai` package carries, so estimation works
offline; tiktoken still checks each file's SHA-256, and where no local copy
exists (a new encoding) it downloads as usual.
"""
from __future__ import annotations

import functools
import gzip
import hashlib
import os
import threading
from pathlib import Path

import tiktoken

# The URLs tiktoken's own constructors load from (tiktoken_ext/openai_public.py).
_ENCODING_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
_lock = threading.Lock()


def _packaged_copy(name: str) -> Path | None:
    try:
        import bpe_openai
    except ImportError:
        return None
    path = Path(bpe_openai.__file__).parent / "data" / f"{name}.tiktoken.gz"
    return path if path.exists() else None


def seed_cache(cache_dir: str, name: str) -> bool:
    """Put the packaged copy of `name` where tiktoken looks first. True if seeded."""
    url = _ENCODING_URLS.get(name)
    source = _packaged_copy(name)
    if url is None or source is None:
        return False
    target = Path(cache_dir) / hashlib.sha1(url.encode()).hexdigest()
    if target.exists():
        return True
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_bytes(gzip.decompress(source.read_bytes()))
    tmp.replace(target)  # atomic: concurrent processes never see half a file
    return True


@functools.cache
def get_encoding(name: str, cache_dir: str) -> tiktoken.Encoding:
    with _lock:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", cache_dir)
        seed_cache(os.environ["TIKTOKEN_CACHE_DIR"], name)
        return tiktoken.get_encoding(name)


def encoding_for_model(model: str | None, default: str) -> str:
    """The encoding an OpenAI model uses (o200k_base for gpt-4o/4.1/o-series,
    cl100k_base for gpt-4/3.5); `default` for unknown or missing models."""
    if model:
        try:
            return tiktoken.encoding_name_for_model(model)
        except KeyError:
            pass
    return default
