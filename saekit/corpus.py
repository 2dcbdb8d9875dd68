"""saekit's own corpus: a seeded, streaming generator of English-like text.

The text is made of short stories about people, places and objects; IOI sentences
("When Mary and John went to the park, John gave a ball to Mary.") from templates in
both ABB and BAB order; and repeated spans, so that induction is learnable.

Some IOI templates and some (IO, S) name pairs are held out: they never appear in the
training stream and are used only to evaluate the model (see ``ioi_prompts``).
Everything is a pure function of the seed, so the same seed gives the same text.
"""

from __future__ import annotations

import random
import zlib
from dataclasses import dataclass
from typing import Iterator, Literal

Split = Literal["train", "heldout"]

# fmt: off
NAMES = (
    "Mary John Alice Bob Tom Anna James Emma Jack Lucy Peter Sarah David Kate Paul Laura Mark Jane "
    "Sam Amy Mike Lisa Dan Rose Tim Grace Ben Claire Adam Helen Ryan Julia Eric Nina Sean Ruth Luke "
    "Ella Carl Diana Adrian Fiona Owen Hannah Ian Irene Leo Joan Max Karen Neil Linda Oscar Maria "
    "Philip Megan Ralph Nora Scott Olivia Steve Paula Victor Rachel Walter Sophie Alan Tina Bruce "
    "Vera Colin Wendy Dennis Abby Edward Beth Frank Carol Gary Donna Henry Eva Harry Fay Igor Gina "
    "Jason Heidi Kevin Iris Larry Jenny Martin Kelly Nathan Leah Otto Molly Patrick Nancy Roger "
    "Pam Simon Rita Thomas Susan Vincent Tara Wayne Ursula Arthur Violet Brian Alexander Charles "
    "Daisy Derek Emily Felix Gloria George Holly Hugo Ivy Jake Joy Keith Lily Louis Mia Morgan "
    "Noah Olive Quinn Ray Ruby Roy Stella Ted Tess Troy Uma Vic Wade Xena Zack Zoe Andy Bella "
    "Chris Cindy Dave Dora Eli Erin Fred Gwen Glen Hope Hank Isla Ivan Jill Joe Kim Kyle Lena Liam "
    "Mabel Matt Nick Nell Omar Opal Pete Pearl Rick Rosa Sue Seth Todd Tilly Will Wanda Yusuf "
    "Yvonne Zara Abel Ada Boris Bianca Cody Cora Dean Edith Ethan Flora Grant Hazel Ida Jude Lara "
    "Mason Maya Ned Nora Otis Pia Reid Sara Tony Una Vince Wren Ali Eve Jim Meg Ron Sid Tom"
).split()
PLACES = (
    "park store school house garden station beach market library office river kitchen farm "
    "church museum hospital cafe forest lake restaurant bakery hotel bank zoo"
).split()
OBJECTS = (
    "ball book drink cup key bag letter hat ring box coat pen apple bottle card gift lamp "
    "map phone plate rope shoe toy watch basket flower candle kite"
).split()
ACTIONS = (
    "walked talked laughed sang danced waited cooked read slept played worked smiled rested "
    "jumped painted wrote studied listened swam shouted"
).split()
# fmt: on
NAMES = tuple(dict.fromkeys(NAMES))  # drop accidental repeats, keep order

# IOI templates. {A} and {B} are the two names of the first clause, {S} is the repeated
# subject; the answer is the indirect object. ABB: A = IO, B = S. BAB: A = S, B = IO.
# The prompt ends right before the indirect object's name.
TRAIN_TEMPLATES = (
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "Then, {A} and {B} were working at the {place}. {S} decided to give a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
    "While {A} and {B} were at the {place}, {S} handed a {object} to",
    "{A} and {B} arrived at the {place}. {S} offered a {object} to",
    "When {A} and {B} got a {object} at the {place}, {S} gave it to",
    "Then {A} and {B} had a long day at the {place}, and {S} gave a {object} to",
    "Yesterday {A} and {B} met at the {place}. Later {S} sent a {object} to",
    "{A} and {B} were cleaning the {place}. Then {S} passed the {object} to",
    "At the {place}, {A} and {B} found a {object}. {S} threw it to",
    "Once {A} and {B} walked to the {place}, {S} brought a {object} to",
    "{A} met {B} at the {place}, and {S} showed the {object} to",
    "The {place} was quiet when {A} and {B} came in. {S} gave the {object} to",
    "After lunch, {A} and {B} went to the {place}. {S} lent a {object} to",
    "Friends {A} and {B} stayed at the {place}, where {S} sold a {object} to",
    "Since {A} and {B} were at the {place}, {S} read a {object} to",
    "During the day, {A} and {B} visited the {place}, and {S} mailed a {object} to",
    "{A} and {B} left the {place}. On the way, {S} returned the {object} to",
    "Both {A} and {B} liked the {place}, so {S} bought a {object} for",
    "In the morning {A} and {B} ran to the {place}. {S} tossed the {object} to",
    "{A} and {B} took a walk to the {place}. Afterwards, {S} gave a {object} to",
    "It was late when {A} and {B} reached the {place}. {S} handed a {object} to",
    "{A} and {B} had fun at the {place}, and then {S} passed a {object} to",
    "On Monday {A} and {B} went to the {place}. {S} gave the {object} to",
    "When the {place} opened, {A} and {B} went inside. {S} offered the {object} to",
    "{A} and {B} were tired after the {place}. {S} brought a {object} to",
    "At night {A} and {B} stayed at the {place}, and {S} lent the {object} to",
    "Before dinner, {A} and {B} walked around the {place}. {S} sent a {object} to",
    "The {place} was busy, so {A} and {B} left early. {S} handed the {object} to",
    "{A} and {B} found the {place} closed. {S} gave a {object} to",
    "Last week {A} and {B} tidied the {place} together. {S} gave the {object} back to",
    "{A} and {B} sat in the {place} for an hour. Then {S} showed a {object} to",
    "After school, {A} and {B} played at the {place}. {S} threw a {object} to",
    "{A} and {B} waited at the {place}. Finally, {S} passed the {object} to",
    "When {A} and {B} came home from the {place}, {S} gave a {object} to",
    "{A} and {B} both worked at the {place}. One day, {S} sold the {object} to",
    "At the {place}, {A} talked with {B}. Then {S} gave a {object} to",
    "{A} and {B} ate lunch at the {place}, and {S} offered a {object} to",
    "In the evening {A} and {B} went to the {place}. There {S} handed a {object} to",
    "{A} and {B} visited the {place}. {S} wanted to give the {object} to",
)
HELDOUT_TEMPLATES = (
    "When {A} and {B} were sitting in the {place}, {S} handed the {object} to",
    "{A} and {B} spent the evening at the {place}. Then {S} gave a {object} to",
    "Later, {A} and {B} went back to the {place}, and {S} passed a {object} to",
    "As {A} and {B} looked around the {place}, {S} gave the {object} to",
    "The day {A} and {B} cleaned the {place}, {S} sent the {object} to",
    "Because {A} and {B} were late to the {place}, {S} threw a {object} to",
)


def pair_is_heldout(a: str, b: str) -> bool:
    """One unordered name pair in eight is held out of training (stable across runs)."""
    key = "|".join(sorted((a, b))).encode()
    return zlib.crc32(key) % 8 == 0


@dataclass(frozen=True)
class IOIPrompt:
    """One IOI prompt; ``text`` ends right before the answer ``" " + io``."""

    text: str
    io: str
    s: str
    order: Literal["ABB", "BAB"]
    template: int
    place: str
    object: str

    @property
    def pos(self) -> int:
        """The paper's `pos` attribute: ABB = 0, BAB = 1."""
        return 0 if self.order == "ABB" else 1


def make_ioi(rng: random.Random, split: Split, names: tuple[str, ...] = NAMES,
             filler: bool = True) -> IOIPrompt:
    """Draw one IOI prompt. ``split="train"`` uses training templates and pairs only (with
    random filler sentences unless ``filler=False``); ``"heldout"`` uses held-out templates
    and held-out pairs only, never with filler."""
    templates = TRAIN_TEMPLATES if split == "train" else HELDOUT_TEMPLATES
    want_heldout = split == "heldout"
    while True:
        io, s = rng.sample(names, 2)
        if pair_is_heldout(io, s) == want_heldout:
            break
    t = rng.randrange(len(templates))
    order = rng.choice(("ABB", "BAB"))
    a, b = (io, s) if order == "ABB" else (s, io)
    place, obj = rng.choice(PLACES), rng.choice(OBJECTS)
    text = templates[t].format(A=a, B=b, S=s, place=place, object=obj)
    if split == "train" and filler:
        text = _with_filler(rng, text)
    return IOIPrompt(text, io, s, order, t, place, obj)


_FILLERS = (
    "It was a nice day at the {place}.", "The {object} was in the {place}.", "It was raining.",
    "The sun was warm.", "Nobody was at the {place}.", "The {object} was new.", "It was quiet.",
)


def _with_filler(rng: random.Random, text: str) -> str:
    """Training prompts get name-free filler sentences at random places half of the time,
    so the model must learn IOI independent of the exact positions of a template."""
    if rng.random() < 0.5:
        return text
    fill = rng.choice(_FILLERS).format(place=rng.choice(PLACES), object=rng.choice(OBJECTS))
    cut = text.find(". ")
    if cut >= 0 and rng.random() < 0.5:
        return f"{text[: cut + 1]} {fill}{text[cut + 1 :]}"
    return f"{fill} {text}"


def ioi_prompts(n: int, split: Split = "heldout", seed: int = 0) -> list[IOIPrompt]:
    """``n`` IOI prompts, deterministic in ``seed``."""
    rng = random.Random(f"ioi-{split}-{seed}")
    return [make_ioi(rng, split) for _ in range(n)]


# The style of Wang et al.'s IOI templates, as used for GPT-2 by Makelov, Lange & Nanda
# (methods.md §7): one clause with both names, the subject repeated, ending before the IO.
PAPER_TEMPLATES = (
    "Then, When {A} and {B} went to the {place}, {S} gave a {object} to",
    "When {A} and {B} went to the {place}, {S} gave a {object} to",
    "After {A} and {B} went to the {place}, {S} gave a {object} to",
)


def render(template_: str, io: str, s: str, order: str, place: str, obj: str) -> str:
    """Fill an IOI template: ABB puts the IO first, BAB the subject."""
    a, b = (io, s) if order == "ABB" else (s, io)
    return template_.format(A=a, B=b, S=s, place=place, object=obj)


def ioi_documents(seed: int = 0) -> Iterator[str]:
    """Endless completed IOI prompts ("... gave a ball to Mary.") from the held-out and the
    paper-style templates, with any names: the IOI distribution SAEs are trained on with
    ``--dataset ioi`` (Makelov et al. train SAEs on IOI prompts beside general text)."""
    rng = random.Random(f"ioi-documents-{seed}")
    templates = HELDOUT_TEMPLATES + PAPER_TEMPLATES
    while True:
        io, s = rng.sample(NAMES, 2)
        text = render(rng.choice(templates), io, s, rng.choice(("ABB", "BAB")),
                      rng.choice(PLACES), rng.choice(OBJECTS))
        yield f"{text} {io}."


# ---- stories ---------------------------------------------------------------------------

_SENTENCES = (
    "{N} went to the {place}.",
    "{N} picked up the {object}.",
    "{N} {action} at the {place}.",
    "{N} and {M} {action} in the {place}.",
    "{N} gave the {object} to {M}.",
    "{N} put the {object} in the {place}.",
    "{N} lost a {object} near the {place}.",
    "{N} asked {M} about the {object}.",
    "{N} {action} with {M}.",
    "The {object} was in the {place}.",
    "{N} saw {M} at the {place}.",
    "{M} thanked {N} for the {object}.",
    "It was a nice day at the {place}.",
    "{N} liked the {object} very much.",
    "{N} {action} all day.",
)


def _sentence(rng: random.Random, cast: list[str]) -> str:
    n, m = rng.sample(cast, 2)
    return rng.choice(_SENTENCES).format(
        N=n, M=m, place=rng.choice(PLACES), object=rng.choice(OBJECTS), action=rng.choice(ACTIONS)
    )


def _repeat_span(rng: random.Random, words: list[str]) -> str:
    """A random word list said twice: only induction (copying) predicts the second half."""
    span = " ".join(rng.choice(words) for _ in range(rng.randint(4, 10)))
    return f"The list was: {span}. Again, the list was: {span}."


def story(rng: random.Random) -> str:
    """One short document: sentences about a small cast, IOI sentences, repeated spans."""
    cast = rng.sample(NAMES, rng.randint(2, 4))
    parts = []
    for _ in range(rng.randint(3, 8)):
        u = rng.random()
        if u < 0.3:
            p = make_ioi(rng, "train")
            parts.append(f"{p.text} {p.io}.")
        elif u < 0.4:
            parts.append(_repeat_span(rng, list(NAMES[:60]) + list(PLACES) + list(OBJECTS)))
        else:
            parts.append(_sentence(rng, cast))
    return " ".join(parts)


def stream_text(seed: int = 0, split: Split = "train") -> Iterator[str]:
    """Endless documents. ``split="heldout"`` draws from a disjoint random stream (same
    distribution, different text) for measuring held-out next-token loss."""
    rng = random.Random(f"corpus-{split}-{seed}")
    while True:
        yield story(rng)


def vocabulary_words() -> list[str]:
    """Every word that must be a single token with its leading space."""
    return list(NAMES) + list(PLACES) + list(OBJECTS)
