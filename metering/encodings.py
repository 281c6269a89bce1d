"""Loading tiktoken encodings without the network.

tiktoken downloads an encoding file on first use and caches it under
TIKTOKEN_CACHE_DIR, named by the SHA-1 of its URL. We seed that cache from the
gzipped copies the installed `bpe-openai` package carries, so estimation works
offline; tiktoken still checks each file's SHA-256, and where no local copy
exists (a new encoding) it downloads as usual.

Mistral's Tekken tokenizers are byte-level BPE too: `mistral-common` (Mistral's
own package) ships them as JSON, which we read straight into a tiktoken
Encoding the way mistral-common's Tekkenizer does (same counts; a test holds
them equal), so Mistral models count exactly, offline, at tiktoken's speed and
without importing mistral-common and its image stack in the web process.
"""
from __future__ import annotations

import base64
import functools
import gzip
import hashlib
import importlib.util
import json
import os
import threading
from pathlib import Path

import tiktoken

# The URLs tiktoken's own constructors load from (tiktoken_ext/openai_public.py).
_ENCODING_URLS = {
    "cl100k_base": "https://openaipublic.blob.core.windows.net/encodings/cl100k_base.tiktoken",
    "o200k_base": "https://openaipublic.blob.core.windows.net/encodings/o200k_base.tiktoken",
}
# Tekken files in mistral-common's data folder. 240911: Mistral's current models (Mistral
# Small 3, Large 2411, Pixtral, Ministral, Codestral 2501); 240718: Mistral NeMo.
TEKKEN_ENCODINGS = ("tekken_240911", "tekken_240718")
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


def tekken_path(name: str) -> Path | None:
    spec = importlib.util.find_spec("mistral_common")  # finds the package without importing it
    if spec is None or spec.origin is None or name not in TEKKEN_ENCODINGS:
        return None
    path = Path(spec.origin).parent / "data" / f"{name}.json"
    return path if path.exists() else None


def _tekken(name: str) -> tiktoken.Encoding:
    path = tekken_path(name)
    if path is None:
        raise ValueError(f"Unknown encoding {name}: mistral-common is not installed or has no {name}.json")
    data = json.loads(path.read_text())
    config = data["config"]
    # The first vocab_size - special ids are special tokens; the BPE ranks are the vocabulary
    # below that size (mistral_common.tokens.tokenizers.tekken.Tekkenizer). Text never encodes
    # to a special token, so the count is the same without them.
    size = config["default_vocab_size"] - config["default_num_special_tokens"]
    ranks = {base64.b64decode(token["token_bytes"]): token["rank"] for token in data["vocab"][:size]}
    return tiktoken.Encoding(name=name, pat_str=config["pattern"], mergeable_ranks=ranks, special_tokens={})


@functools.cache
def get_encoding(name: str, cache_dir: str) -> tiktoken.Encoding:
    if name in TEKKEN_ENCODINGS:
        return _tekken(name)
    with _lock:
        os.environ.setdefault("TIKTOKEN_CACHE_DIR", cache_dir)
        seed_cache(os.environ["TIKTOKEN_CACHE_DIR"], name)
        return tiktoken.get_encoding(name)


def encoding_for_model(model: str | None, default: str) -> str:
    """The encoding an OpenAI model uses (o200k_base for gpt-4o/4.1/o-series,
    cl100k_base for gpt-4/3.5); `default` for unknown or missing models, and for
    a provider whose encodings are not OpenAI's (a Mistral model is counted with
    its provider's encoding, whatever the model is called)."""
    if model and default in _ENCODING_URLS:
        try:
            return tiktoken.encoding_name_for_model(model)
        except KeyError:
            pass
    return default
