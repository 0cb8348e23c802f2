"""A replay buffer of conversations that samples across topics, so that a busy topic cannot crowd out the rest.

Conversations are kept by topic (`topics.topic_of` of the user's question).
When the buffer is full, a new one evicts a random member of the largest topic
(its own, when that is as large);
a draw picks a topic uniformly among those kept, then a member of it uniformly.
So a topic that floods the stream for a while (one product launch, one bad day)
holds at most its share of the buffer and of every replayed step. Numpy's
generator, seeded, decides; its state is part of the snapshot.

>>> import numpy as np
>>> from streamlearn.learners.lm.chat import Tokens
>>> buffer = TopicReplay(capacity=4, seed=0)
>>> for i in range(10):
...     buffer.add(Tokens(np.arange(3, dtype=np.int32), 1), topic=0)
>>> buffer.add(Tokens(np.arange(5, dtype=np.int32), 2), topic=7)
>>> len(buffer), sorted(buffer.sizes().items())
(4, [(0, 3), (7, 1)])
>>> sorted({t for t in buffer.sample_topics(200)})
[0, 7]
"""

from __future__ import annotations

from typing import Optional

import numpy as np

from streamlearn.learners.lm.chat import Tokens


class TopicReplay:
    """Tokenized conversations by topic, bounded by `capacity`, sampled topic first."""

    def __init__(self, capacity: int, seed: int) -> None:
        self.capacity = capacity
        self.rng = np.random.default_rng(seed)
        self.topics: dict[int, list[Tokens]] = {}
        self.size = 0

    def __len__(self) -> int:
        return self.size

    def sizes(self) -> dict[int, int]:
        return {topic: len(items) for topic, items in self.topics.items()}

    def add(self, tokens: Tokens, topic: int) -> None:
        """Keeps `tokens` under `topic`; when full, a random member of the largest topic (this one if it is as large)
        makes room."""
        if self.capacity == 0:
            return
        if self.size >= self.capacity:   # the newcomer's own topic gives way when it is (one of) the largest
            largest = max(sorted(self.topics), key=lambda t: len(self.topics[t]))
            if len(self.topics.get(topic, ())) >= len(self.topics[largest]):
                largest = topic
            members = self.topics[largest]
            members[int(self.rng.integers(len(members)))] = members[-1]
            members.pop()
            if not members:
                del self.topics[largest]
            self.size -= 1
        self.topics.setdefault(topic, []).append(tokens)
        self.size += 1

    def sample(self, count: int) -> list[Tokens]:
        """`count` conversations (fewer if the buffer holds fewer): for each, a topic, then one of its members."""
        return [self._draw(topic) for topic in self.sample_topics(min(count, self.size))]

    def sample_topics(self, count: int) -> list[int]:
        kept = sorted(self.topics)
        return [kept[int(i)] for i in self.rng.integers(len(kept), size=count)] if kept else []

    def _draw(self, topic: int) -> Tokens:
        members = self.topics[topic]
        return members[int(self.rng.integers(len(members)))]

    # --- snapshot: arrays without pickle, and the generator's state ----------------------------------------------

    def arrays(self) -> dict[str, np.ndarray]:
        members = [(topic, item) for topic in sorted(self.topics) for item in self.topics[topic]]
        ids = [item.ids for _, item in members]
        return {"ids": np.concatenate(ids) if ids else np.zeros(0, np.int32),
                "lengths": np.array([len(i) for i in ids], dtype=np.int64),
                "starts": np.array([item.start for _, item in members], dtype=np.int64),
                "topics": np.array([topic for topic, _ in members], dtype=np.int64)}

    def load(self, arrays: dict[str, np.ndarray], rng_state: Optional[dict]) -> None:
        self.topics, self.size = {}, 0
        offsets = np.concatenate([[0], np.cumsum(arrays["lengths"])])
        for k, (topic, start) in enumerate(zip(arrays["topics"].tolist(), arrays["starts"].tolist())):
            ids = np.array(arrays["ids"][offsets[k]:offsets[k + 1]], dtype=np.int32)
            self.topics.setdefault(topic, []).append(Tokens(ids, start))
            self.size += 1
        if rng_state is not None:
            self.rng.bit_generator.state = rng_state
