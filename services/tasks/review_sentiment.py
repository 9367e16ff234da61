"""Built-in use case: is a product review positive or negative? Exported as prompts with labels (`regex` checker).

The job a support or product team distils a small model for: route and count thousands of reviews a day without
paying for a large model on each one. A seeded generator writes reviews of everyday products from an opener, one
to three opinions about aspects of the product (battery, sound, delivery, …) and a closer; some reviews contrast a
small complaint with an overall verdict ("The case scratches easily, but the sound is superb and I'd buy it
again"), so the label is the overall sentiment, not the first word that carries one.

Held-out reviews are phrase-disjoint from training ones: in every list of phrases (each aspect's positive and
negative opinions, the verdicts, the contrasts) the `EVAL_PHRASE_FRACTION` of phrases with the smallest hash (at
least one) are held out, and a review is written only from the phrases of its own split. Products, openers and
the review's shape are shared, so both splits have the same length and mix; a student cannot pass the held-out
set by remembering which phrases went with which label in training.
"""

from __future__ import annotations

import hashlib
import random

from services.tasks.dataset import Content, Example, fill_splits

NAME = "review_sentiment"
CHECKER = r"regex:(?i)\b(positive|negative)\b"
SYSTEM_PROMPT = "Classify the sentiment of the customer review as positive or negative. Answer with one word."
EVAL_PHRASE_FRACTION = 0.2

PRODUCTS = [
    "pair of headphones", "blender", "backpack", "phone case", "coffee maker", "desk lamp", "pair of running shoes",
    "office chair", "electric kettle", "keyboard", "water bottle", "vacuum cleaner", "tent", "smart watch", "toaster",
    "jacket", "yoga mat", "bluetooth speaker", "air fryer", "suitcase", "mouse", "rice cooker", "hair dryer", "monitor",
    "frying pan", "sleeping bag", "webcam", "bike helmet", "umbrella", "power bank",
]  # fmt: skip
OPENERS = [
    "I bought this {product} last month.", "Got the {product} as a gift for my sister.", "Ordered this {product} "
    "for my new apartment.", "I've been using this {product} every day for a few weeks.", "We replaced our old "
    "{product} with this one.", "Picked up this {product} on sale.", "This is my second {product} from this brand.",
    "I needed a {product} for travel.", "Bought the {product} after reading a lot of reviews.", "",
]  # fmt: skip
# Opinions about one aspect: (aspect phrase, positive phrases, negative phrases).
ASPECTS: list[tuple[str, list[str], list[str]]] = [
    ("battery", ["The battery lasts for days", "Battery life is excellent", "It holds a charge all week"],
     ["The battery dies within an hour", "Battery life is awful", "It barely holds a charge"]),
    ("quality", ["The build quality is superb", "It feels solid and well made", "The materials are top notch"],
     ["It feels cheap and flimsy", "The plastic cracked after a week", "The build quality is terrible"]),
    ("delivery", ["It arrived two days early", "Shipping was fast and the box was perfect",
                  "Delivery was quick and painless"],
     ["It arrived three weeks late", "The box showed up crushed", "Shipping took forever"]),
    ("ease", ["Setting it up took two minutes", "It is so easy to use", "The controls are simple and intuitive"],
     ["The setup was a nightmare", "The controls are confusing", "The manual is useless and setup took hours"]),
    ("noise", ["It runs quietly", "It is whisper quiet", "I can barely hear it running"],
     ["It is unbearably loud", "It makes a horrible rattling noise", "The noise drives me crazy"]),
    ("price", ["It is worth every penny", "Great value for the money", "For this price it is a steal"],
     ["It is a total waste of money", "Way overpriced for what you get", "Not worth half the price"]),
    ("support", ["Customer service fixed my issue right away", "The support team was friendly and helpful",
                 "They replaced a missing part within a day"],
     ["Customer service never answered my emails", "The support team was rude",
      "They refused to honor the warranty"]),
    ("comfort", ["It is really comfortable", "It fits perfectly", "I can use it for hours without any discomfort"],
     ["It is painfully uncomfortable", "It pinches after ten minutes", "It fits badly and hurts"]),
    ("performance", ["It works flawlessly", "Performance is outstanding", "It does exactly what it promises"],
     ["It stopped working after two days", "It constantly malfunctions", "It never worked properly"]),
    ("design", ["It looks beautiful on my desk", "The design is sleek and modern", "I love the color"],
     ["It looks ugly in person", "The color is nothing like the photos", "The design is clumsy and awkward"]),
]  # fmt: skip
VERDICTS = {
    "positive": ["I love it.", "Highly recommend.", "I would buy it again.", "Five stars from me.",
                 "Very happy with this purchase.", "Best purchase I made this year.", "It exceeded my expectations.",
                 "Absolutely fantastic.", "My whole family loves it.", "I'm impressed."],
    "negative": ["I regret buying it.", "Avoid this one.", "I'm returning it.", "One star is too many.",
                 "Very disappointed with this purchase.", "Worst purchase I made this year.",
                 "It fell far short of my expectations.", "Absolutely terrible.", "Save your money.",
                 "I want a refund."],
}  # fmt: skip
# Contrasts: a small complaint (or praise) before the overall verdict of the other polarity.
CONTRASTS = {
    "positive": ["The packaging was a bit wasteful, but", "It took a while to arrive, but",
                 "The instructions are vague, but", "It is a little heavy, but"],
    "negative": ["It looks nice, but", "The price was good, but", "Delivery was fast, but",
                 "The box was lovely, but"],
}  # fmt: skip


def _rank(phrase: str) -> str:
    return hashlib.sha256(f"{NAME}/phrase/{phrase}".encode()).hexdigest()


def split_phrases(phrases: list[str], split: str, eval_fraction: float = EVAL_PHRASE_FRACTION) -> list[str]:
    """The phrases of a list that belong to `split`: the held-out ones have the smallest hashes (at least one)."""
    held_out = set(sorted(phrases, key=_rank)[: max(1, round(eval_fraction * len(phrases)))])
    return [p for p in phrases if (p in held_out) == (split == "eval")]


def _lower_first(text: str) -> str:
    return text[0].lower() + text[1:] if text else text


def _review(rng: random.Random, label: str, split: str) -> tuple[str, list[str]]:
    """A review of the given overall label from `split`'s phrases, and the sentiment-bearing phrases it uses."""
    product = rng.choice(PRODUCTS)
    aspects = rng.sample(ASPECTS, rng.randint(1, 3))
    phrases: list[str] = []
    sentences: list[str] = []
    opener = rng.choice(OPENERS).format(product=product)
    if opener:
        sentences.append(opener)
    contrast = rng.random() < 0.25
    for i, (_, positive, negative) in enumerate(aspects):
        phrase = rng.choice(split_phrases(positive if label == "positive" else negative, split))
        phrases.append(phrase)
        if contrast and i == 0:
            lead = rng.choice(split_phrases(CONTRASTS[label], split))
            phrases.append(lead)
            sentences.append(f"{lead} {_lower_first(phrase)}.")
        else:
            sentences.append(f"{phrase}.")
    verdict = rng.choice(split_phrases(VERDICTS[label], split))
    phrases.append(verdict)
    sentences.append(verdict)
    return " ".join(sentences), phrases


def messages(review: str) -> Content:
    return Content(messages=(("system", SYSTEM_PROMPT), ("user", f"Review: {review}")))


def generate(n_train: int, n_eval: int, seed: int = 0) -> list[Example]:
    """`n_train` training and `n_eval` held-out reviews, half positive, phrase-disjoint, reproducible."""
    rng = random.Random(f"{NAME}/{seed}")

    def draw(wanted: dict[str, int]) -> Example:
        # Each split in proportion to what it still needs, so both fill at the same pace.
        split = "eval" if rng.random() * (wanted["train"] + wanted["eval"]) < wanted["eval"] else "train"
        label = "positive" if rng.random() < 0.5 else "negative"
        review, phrases = _review(rng, label, split)
        return Example(
            id=f"rev-{hashlib.sha256(review.encode()).hexdigest()[:12]}",
            content=messages(review),
            reference=label,
            split=split,
            metadata={"label": label, "phrases": " | ".join(phrases)},
        )

    return fill_splits(n_train, n_eval, draw, "reviews", tries=100)
