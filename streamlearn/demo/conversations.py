"""Conversation traffic for a language model: small tasks taught by feedback, and everyday questions.

Three tasks, each a few made-up facts or a format, asked in several wordings
(the last wording, or a few names, held back as the task's probe):

- `products` (facts): the prices of eight made-up products;
- `greetings` (a new answer format): "Hello, NAME! Welcome to Acme Support.";
- `errors` (another domain): what eight made-up error codes mean.

Beside them, everyday questions a base model can already answer: the first
`SEEN` come up in the traffic (answered as the base answers them, and liked), the
rest never do (the general capability's probes: the base's own answers to them,
and the key fact each answer should mention, `FACTS`). The served answer to a task's
question was mostly wrong and corrected by the feedback, now and then right and
liked. Everything is drawn from fixed seeds: the same arguments give the same events.

>>> pairs = task_pairs("products", reps=1, everyday={q: "ok" for q in EVERYDAY})
>>> len(pairs), probe_pairs("products")[0]
(50, ('Tell me the price of the Zorblax 3000.', '$149'))
>>> [e["rating"] for e in feedback_events([("What do bees make?", "Honey.")], start=0, t0=0.0, seed=0)[1::2]]
[1]
"""

from __future__ import annotations

import random
import re

TASKS = ("products", "greetings", "errors")
PRODUCTS = [("Zorblax 3000", 149), ("Quillfire Pro", 89), ("Nebulon Mini", 37), ("Trakka X2", 215),
            ("Velvex Air", 64), ("Grommit Duo", 128), ("Plinth One", 52), ("Oskari Max", 310)]
PRICE_ASKED = ["How much does the {} cost?", "What is the price of the {}?", "What does the {} cost?",
               "How much is the {}?", "Price of the {}?", "Tell me the price of the {}."]   # the last: the probe
NAMES = ["Alice", "Bruno", "Chiara", "Dmitri", "Elena", "Farid", "Greta", "Hiro", "Ines", "Jonas", "Kofi", "Lena",
         "Mateo", "Nadia", "Omar", "Priya", "Quentin", "Rosa", "Sven", "Tamar"]
NEW_NAMES = ["Umberto", "Vera", "Wanda", "Yusuf", "Zoltan", "Amara", "Bjorn", "Carmen"]   # the probe
GREET_ASKED = ["Greet {}.", "Say hello to {}.", "Please welcome {}."]   # the last: the probe's wording
ERRORS = [("E101", "the printer is out of toner"), ("E202", "the badge reader is offline"),
          ("E303", "the coffee machine needs descaling"), ("E404", "the meeting room is double-booked"),
          ("E505", "the VPN token has expired"), ("E606", "the parking gate is jammed"),
          ("E707", "the mailbox quota is full"), ("E808", "the desk booking failed")]
ERROR_ASKED = ["What does error {} mean?", "What is error {}?", "Explain error code {}.", "I got error {}. What is it?",
               "Error {}: what does it mean?", "What does the error code {} stand for?"]   # the last: the probe
EVERYDAY = ["What is the capital of France?", "How many days are in a week?", "What color is the sky on a clear day?",
            "What is 2 plus 2?", "Name a fruit that is yellow.", "What do bees make?", "What is the opposite of hot?",
            "How many legs does a spider have?", "What is the largest planet in our solar system?",
            "What language is spoken in Spain?", "What do you call a baby cat?", "What is water made of?",
            "Which animal is known as the king of the jungle?", "What is the boiling point of water in Celsius?",
            "How many continents are there?", "What is the freezing point of water in Fahrenheit?",
            "Who wrote Romeo and Juliet?", "What is the chemical symbol for gold?", "How many hours are in a day?",
            "What shape has three sides?", "What is the tallest animal?", "How many months are in a year?",
            "What gas do plants breathe in?", "What is the color of grass?", "What do cows drink?",
            "Which planet is known as the red planet?", "How many wheels does a bicycle have?",
            "What is the main language of Brazil?", "What is ice made of?", "What instrument has 88 keys?",
            "What is the capital of Italy?", "How many minutes are in an hour?", "What color are bananas?",
            "What do spiders spin?", "What is the opposite of up?", "How many sides does a square have?",
            "What is the closest star to Earth?", "What language is spoken in Germany?", "What do you call a baby dog?",
            "What is the largest ocean on Earth?", "Which animal has a long trunk?", "What is 10 minus 3?",
            "What season comes after winter?", "What do we use to see?", "What is the capital of Japan?",
            "How many legs does a dog have?", "What color do you get by mixing red and white?",
            "What do birds use to fly?", "What is frozen rain called?", "Who painted the Mona Lisa?"]
PROBE_METRIC = {"products": "contains", "greetings": "exact_match", "errors": "contains"}   # facts, format, facts
SEEN = 30                 # everyday questions that come up in the traffic; the rest are the general probe
# The key fact of each everyday question the traffic never asks: what a `contains` capability looks for.
FACTS = ["Rome", "60", "yellow", "webs", "down", "4", "Sun", "German", "puppy", "Pacific", "elephant", "7", "spring",
         "eyes", "Tokyo", "4", "pink", "wings", "hail", "Leonardo"]
EVERYDAY_SHARE = 0.2      # of each task's traffic
LIKED_SHARE = 0.25        # of a task's answers: right when served, and liked
WRONG = "I'm not sure, sorry."   # what was served when the answer was wrong
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f]")


def base_answers(model, tokenizer, max_new_tokens: int = 40) -> dict[str, str]:
    """Every everyday question with the base model's own greedy answer (what it could do before learning), its
    control characters (a random test model's) taken out, as the event contract refuses them."""
    from streamlearn.learners.lm.capabilities import generate
    from streamlearn.records import Turn

    answers = generate(model, tokenizer, [[Turn("user", q)] for q in EVERYDAY], max_new_tokens)
    return {q: _CONTROL.sub("", a).strip() or "?" for q, a in zip(EVERYDAY, answers)}


def task_pairs(task: str, reps: int, everyday: dict[str, str]) -> list[tuple[str, str]]:
    """(question, right answer) of a task's traffic, `reps` times over, with everyday questions (answered as
    `everyday` says: the base model's own answers) making up `EVERYDAY_SHARE` of it, shuffled."""
    if task == "products":
        pairs = [(q.format(p), f"The {p} costs ${c}.") for p, c in PRODUCTS for q in PRICE_ASKED[:-1]]
    elif task == "greetings":
        pairs = [(q.format(n), greeting(n)) for n in NAMES for q in GREET_ASKED[:2]]
    else:
        pairs = [(q.format(e), f"Error {e} means {m}.") for e, m in ERRORS for q in ERROR_ASKED[:-1]]
    stream = pairs * reps
    rng = random.Random(task)
    extra = round(len(stream) * EVERYDAY_SHARE / (1 - EVERYDAY_SHARE))
    stream += [(q, everyday[q]) for q in rng.choices(EVERYDAY[:SEEN], k=extra)]
    rng.shuffle(stream)
    return stream


def greeting(name: str) -> str:
    return f"Hello, {name}! Welcome to Acme Support."


def probe_pairs(task: str) -> list[tuple[str, str]]:
    """A task's probe: questions its traffic never asks in these words (or about these names), with what the
    answer must say: the fact (`contains`: "$149", however worded) or, for the format, the whole answer."""
    if task == "products":
        return [(PRICE_ASKED[-1].format(p), f"${c}") for p, c in PRODUCTS]
    if task == "greetings":
        return [(GREET_ASKED[-1].format(n), greeting(n)) for n in NEW_NAMES]
    return [(ERROR_ASKED[-1].format(e), m) for e, m in ERRORS]


def feedback_events(pairs: list[tuple[str, str]], start: int, t0: float, seed: int,
                    model: str = "assistant") -> list[dict]:
    """An inference log and its feedback per pair, one second of event time apart, ids from `start`: an everyday
    question answered as expected and liked; a task's answer mostly wrong and corrected, now and then right and
    liked."""
    rng, out = random.Random(seed), []
    for i, (question, answer) in enumerate(pairs, start):
        liked = question in EVERYDAY or rng.random() < LIKED_SHARE
        out.append({"request_id": f"r-{i}", "ts": t0 + i, "model": model, "model_version": "base",
                    "messages": [{"role": "user", "content": question}], "answer": answer if liked else WRONG})
        feedback = {"request_id": f"r-{i}", "ts": t0 + i + 0.5, "rating": 1 if liked else -1}
        out.append(feedback if liked else {**feedback, "correction": answer})
    return out


def capability_lines(pairs: list[tuple[str, str]]) -> list[dict]:
    """A capability file's lines (`models.NAME.lm.capabilities`) of (question, expected answer) pairs."""
    return [{"messages": [{"role": "user", "content": q}], "answer": a} for q, a in pairs]
