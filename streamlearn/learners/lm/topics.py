"""Topics of conversations: a hashed embedding of the user's words, cut by random hyperplanes (SimHash).

The content words of the last user message (common function words and anything
holding a digit, such as order numbers and amounts, left out) are
hashed into a fixed-size vector (stable hashes: no process seed), and the signs of its projections on
`bits` fixed random directions give the topic, one of `2**bits`. Conversations
sharing most of their words (in any order, any case) land in the same topic; no vocabulary or model is
learned, so a topic means the same across restarts and replicas.

>>> topic_of("What is the price of the Zorblax 3000?", 4) == topic_of("Zorblax 3000: what's its price?", 4)
True
>>> len({topic_of(q, 4) for q in ["price of the Zorblax?", "Write a haiku about rain", "Translate cat to French"]})
3
"""

from __future__ import annotations

import re
import zlib

import numpy as np

DIMENSIONS = 1024
_WORD = re.compile(r"[a-z0-9]+")
_COMMON = frozenset("a an and are as at be but by can could do does for from had has have how i in is it its me my "
                    "not of on or please s so that the their them there these this to was we were what when where "
                    "which who why will with would you your".split())
_PLANES = np.random.default_rng(20261201).standard_normal((8, DIMENSIONS))   # constant: topic_bits <= 8


def embed(text: str) -> np.ndarray:
    """The hashed bag of content words of `text` (lower-cased), L2-normalised."""
    vector = np.zeros(DIMENSIONS)
    words = {w for w in _WORD.findall(text.lower()) if w.isalpha()}   # "a12", "2024": ids and amounts, no topic
    for gram in words - _COMMON:
        code = zlib.crc32(gram.encode())
        vector[code % DIMENSIONS] += 1.0 if code & 0x80000000 else -1.0   # a signed hash keeps collisions unbiased
    norm = np.linalg.norm(vector)
    return vector / norm if norm else vector


def topic_of(text: str, bits: int) -> int:
    """The topic of `text`: which side of each of `bits` hyperplanes its embedding lies on."""
    if bits == 0:
        return 0
    signs = _PLANES[:bits] @ embed(text) > 0
    return int(np.dot(signs, 1 << np.arange(bits)))
