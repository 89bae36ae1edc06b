"""How text is cut into words: shared by the tokenizer and by the data that aligns words to
objects, and free of torch so the data side can use it."""

from __future__ import annotations

import re
import unicodedata

_WORD = re.compile(r"\w+|[^\w\s]", re.UNICODE)


def split_words(text: str) -> list[str]:
    """Lower-cased, NFKC-normalised words and punctuation marks, in order."""
    return _WORD.findall(unicodedata.normalize("NFKC", text).lower())
