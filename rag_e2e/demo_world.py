"""A synthetic knowledge world for the embedded demo, written in DPR's real file formats.

No pretrained generator and no real corpus exist offline, so the demo invents one: fictional
people, towns, firms and bands with invented names, each described by one ~100-word passage
(like DPR's 100-word Wikipedia chunks), and questions about them phrased unlike the passages.
Held-out questions are about entities that no training question mentions, so only retrieval
can answer them; answers are invented names or years from wide ranges, so guessing fails.

Everything is drawn from `random.Random(seed)` and only lists are iterated (never sets, whose
order depends on PYTHONHASHSEED), so one seed gives byte-identical files on every machine.

    python -m rag_e2e.demo_world data/demo --seed 0 --tokenizer-dir data/demo/tokenizer
"""

from __future__ import annotations

import argparse
import inspect
import csv
import io
import json
import os
import random
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rag_e2e.checkpoint import save_pretrained_beside

SPECIAL_TOKENS = ["<s>", "<pad>", "</s>", "<unk>", "<mask>"]  # BART's ids 0..4
_ONSETS = "b br d dr f g gr h k kr l m n p pr r s st t tr v z th sh".split()
_VOWELS = "a e i o u a e o i ae ei ou".split()
_CODAS = ["", "", "", "", "n", "r", "l", "s", "m", "k", "x"]

# ---------------------------------------------------------------- the world's phrasebook
# Placeholders: {name} full name, {short} a later reference (surname, "the firm"), {he}/{his}
# pronouns, {v} the fact's value, {desc} occupation/genre/trade, {adj} a kind of town.
# Passages and questions share no phrasing on purpose: the question names the entity (so a
# sentence encoder can find the passage) but the relation is worded differently.

KIND_SHARE = {"person": 0.45, "city": 0.2, "company": 0.2, "band": 0.15}

# relation -> (value kind, passage templates, question templates)
RELATIONS: dict[str, dict[str, tuple[str, list[str], list[str]]]] = {
    "person": {
        "birthplace": ("city", [
            "{short} was born in the {adj} town of {v}.", "{he} spent {his} early years in {v}, the town of {his} birth.",
            "Born in {v}, {short} left home young.", "{his} family came from {v}, where {he} was born."], [
            "Where does {name} come from?", "What is the hometown of {name}?",
            "Which town is {name} originally from?", "Where was {name} born?"]),
        "birth_year": ("year:1700-2000", [
            "Parish records date {his} birth to {v}.", "{short} came into the world in {v}.",
            "{he} was born in the year {v}.", "The year of {his} birth was {v}."], [
            "In what year was {name} born?", "When was {name} born?",
            "What is the birth year of {name}?", "In which year did the life of {name} begin?"]),
        "employer": ("company", [
            "For many years {short} worked for {v}.", "{he} later joined {v} as a {desc}.",
            "{short} spent most of {his} career at {v}.", "{his} longest employment was with {v}."], [
            "Which company employed {name}?", "Who was the employer of {name}?",
            "For which firm did {name} work?", "What organisation hired {name}?"]),
        "mentor": ("person", [
            "{short} studied under {v}.", "{he} was trained by {v}.", "{his} teacher was {v}.",
            "As a student {he} learned the craft from {v}."], [
            "Who taught {name}?", "Who was the mentor of {name}?",
            "Under whose guidance did {name} train?", "Who instructed {name} as a young apprentice?"]),
        "work": ("title", [
            "{his} best known work is {v}.", "{short} is remembered above all for {v}.",
            "{his} most celebrated piece, {v}, is still studied.", "Critics praise {v} as {his} finest achievement."], [
            "What is {name} famous for?", "Which work made {name} famous?",
            "What is the masterpiece of {name}?", "Name the most acclaimed creation of {name}."]),
    },
    "city": {
        "river": ("river", [
            "{name} lies on the banks of the {v}.", "The {v} flows through the centre of {short}.",
            "{short} grew up around a ford across the {v}.", "Boats on the {v} still carry goods past {short}."], [
            "Which river runs through {name}?", "What river is {name} built on?",
            "Name the river that crosses {name}.", "On which river does {name} stand?"]),
        "founded": ("year:1100-1900", [
            "{short} was founded in {v}.", "The first settlement at {name} dates from {v}.",
            "A charter granted in {v} marks the beginning of {short}.", "Settlers arrived at the site in {v}."], [
            "When was {name} established?", "In what year did {name} begin?",
            "What year did settlers first build {name}?", "When did {name} come into existence?"]),
        "founder": ("person", [
            "Its founder was the merchant {v}.", "{short} owes its existence to {v}, who laid out the first streets.",
            "The settlement was established by {v}.", "Local tradition credits {v} with founding the town."], [
            "Who founded {name}?", "Who established the town of {name}?",
            "Who is credited with creating {name}?", "Which person laid the foundations of {name}?"]),
        "twin": ("city", [
            "{short} is twinned with {v}.", "For generations {short} has kept a partnership with {v}.",
            "A friendship treaty links {short} with {v}.", "Every summer a delegation from {v}, its sister town, visits."], [
            "What is the sister city of {name}?", "Which town is {name} paired with?",
            "Which town is partnered with {name}?", "With which place does {name} have a twinning arrangement?"]),
        "export": ("goods", [
            "The main trade of {short} is {v}.", "Most of the wealth of {short} comes from {v}.",
            "Merchants ship {v} from its docks.", "{short} is known for producing {v}."], [
            "What does {name} mainly export?", "What is the chief product of {name}?",
            "What goods is {name} known for selling?", "What commodity made {name} rich?"]),
    },
    "company": {
        "founded": ("year:1750-2015", [
            "{name} was incorporated in {v}.", "The firm opened its doors in {v}.",
            "{short} began trading in {v}.", "Its first office opened in {v}."], [
            "When was {name} founded?", "In what year was {name} started?",
            "What year did {name} begin business?", "In which year was {name} set up?"]),
        "founder": ("person", [
            "It was started by {v}.", "{v} founded the firm with borrowed money.",
            "The company was the creation of {v}.", "Its founder, {v}, ran it for decades."], [
            "Who started {name}?", "Who is the founder of {name}?",
            "Which entrepreneur created {name}?", "Who set up {name}?"]),
        "headquarters": ("city", [
            "Its headquarters are in {v}.", "The head office stands in {v}.",
            "{short} is based in {v}.", "From its offices in {v} the firm runs its business."], [
            "Where is {name} headquartered?", "In which town is the main office of {name}?",
            "Where is {name} located?", "What city hosts the headquarters of {name}?"]),
        "product": ("product", [
            "{short} is best known for the {v}.", "Its flagship product is the {v}.",
            "The {v} made the firm famous.", "Sales of the {v} account for most of its revenue."], [
            "What is the flagship product of {name}?", "What does {name} sell?",
            "Which product is {name} known for?", "What item made {name} successful?"]),
    },
    "band": {
        "formed": ("year:1950-2020", [
            "The group formed in {v}.", "{name} played its first concert in {v}.",
            "{short} came together in {v}.", "The line up first met in {v}."], [
            "When did {name} form?", "In what year was {name} founded?",
            "What year did {name} start playing?", "When was {name} put together?"]),
        "singer": ("person", [
            "Its lead vocalist is {v}.", "{v} sings and writes most of the songs.",
            "The voice of the group belongs to {v}.", "{v} fronts the band."], [
            "Who sings for {name}?", "Who is the lead singer of {name}?",
            "Whose voice leads {name}?", "Who is the vocalist in {name}?"]),
        "hometown": ("city", [
            "The band comes from {v}.", "{short} was formed in the town of {v}.",
            "Its members grew up together in {v}.", "{short} still rehearses in {v}, its home town."], [
            "Where is {name} from?", "What is the home town of {name}?",
            "Which town did {name} originate in?", "Where did the members of {name} grow up?"]),
        "album": ("title", [
            "Its debut album was {v}.", "The first record by {short}, {v}, sold well.",
            "{short} released {v} as its first album.", "{v} was the record that launched the group."], [
            "What was the first album of {name}?", "What debut record did {name} release?",
            "Name the first LP by {name}.", "What was the earliest album of {name} called?"]),
        "label": ("company", [
            "The band is signed to {v}.", "Its records are released by {v}.",
            "{v} distributes its music.", "A contract with {v} gave the group its break."], [
            "Which label does {name} record for?", "Who publishes the records of {name}?",
            "What company releases the music of {name}?", "Which record company signed {name}?"]),
    },
}

INTROS = {
    "person": ["{name} was a {desc}.", "{name} was a {desc} of some renown.",
               "The {desc} {name} worked quietly for decades.", "{name} is remembered as a gifted {desc}."],
    "city": ["{name} is a {desc} in the north of the country.", "{name} is a small {desc} on the southern plain.",
             "{name} is an old {desc} in the eastern hills.", "{name} is a {desc} near the western coast."],
    "company": ["{name} is a {desc} company.", "{name} is a firm in the {desc} trade.",
                "{name} is a family business in {desc}.", "{name} is a mid sized {desc} concern."],
    "band": ["{name} is a {desc} group.", "{name} is a {desc} band.",
             "{name} is a touring {desc} ensemble.", "{name} is a well loved {desc} act."],
}

FILLERS = {
    "person": [
        "Contemporaries described {short} as restless and exacting.", "{he} rarely gave interviews and kept few letters.",
        "Much of {his} early life is poorly documented.", "{he} travelled widely and wrote long letters home.",
        "{short} worked late into the night and slept little.", "Friends remembered {his} dry humour and patience.",
        "{he} was elected to several learned societies.", "Later in life {he} took on many pupils of {his} own.",
        "A small museum now holds some of {his} papers.", "{his} methods were considered unusual at the time.",
        "{he} married late and had no children.", "Several biographies have tried to explain {his} long silence.",
    ],
    "city": [
        "The old quarter is known for its narrow lanes and covered markets.", "A stone bridge links the two halves of {short}.",
        "{short} holds a large fair every autumn.", "Its cathedral was rebuilt twice after fires.",
        "The climate is mild, with wet winters.", "A railway line reached {short} late in its history.",
        "{short} has a small university and a public library.", "Its population grew quickly during the last century.",
        "The town hall houses a collection of old maps.", "Visitors often remark on the painted houses along the square.",
        "{short} is governed by an elected council.", "Many families have lived in {short} for generations.",
    ],
    "company": [
        "The firm employs several hundred people.", "{short} survived two periods of near bankruptcy.",
        "Its accounts are published every spring.", "The company has a reputation for careful engineering.",
        "{short} expanded abroad after a long period of caution.", "Its workshops are open to visitors once a year.",
        "The board has rarely changed over the years.", "{short} sponsors a local football club.",
        "Its early catalogues are now collectors' items.", "Rival firms have often copied its designs.",
        "A strike once closed the company for a whole season.", "{short} keeps an archive of its own history.",
    ],
    "band": [
        "The group has toured widely.", "Critics have called its sound warm and unhurried.",
        "{short} has changed drummers several times.", "Its concerts are known for long improvised passages.",
        "The members share writing credits equally.", "{short} took a long break before returning to the stage.",
        "Its songs often tell stories about the sea.", "The band has a loyal following in small venues.",
        "{short} recorded its early songs in a converted barn.", "A documentary about the group appeared on television.",
        "Its live recordings are popular with fans.", "The group rarely plays the same set twice.",
    ],
}

# Sentences naming another entity ({o}, of the tagged kind) without stating a fact about it:
# the many passages that mention a name, of which only one is about it (as in Wikipedia).
MENTIONS = {
    "person": [("person", "{short} corresponded for years with {o}."),
               ("person", "{he} counted {o} among {his} closest friends."),
               ("person", "A rivalry with {o} shaped {his} middle years."),
               ("band", "{he} was a lifelong admirer of {o}."), ("city", "{he} once gave a lecture in {o}.")],
    "city": [("person", "A statue of {o} stands in the main square."), ("person", "{o} lived in {short} for a time."),
             ("person", "The writer {o} described {short} fondly."),
             ("band", "{o} once played a famous concert in {short}."), ("city", "A long road leads from {short} to {o}.")],
    "company": [("person", "{o} once praised its workmanship."),
                ("person", "A biography of {o} mentions the firm often."),
                ("person", "{o} sat on its advisory board for a short time."),
                ("band", "Its advertisements once featured {o}."), ("city", "It keeps a small warehouse in {o}.")],
    "band": [("person", "{o} produced one of its records."), ("person", "Its name was suggested by {o}."),
             ("person", "{o} joined the group on stage for one tour."),
             ("band", "It has often shared a stage with {o}."), ("city", "Its most famous concert took place in {o}.")],
}

WORDS = {
    "person_desc": ["painter", "engineer", "sculptor", "poet", "cartographer", "botanist", "architect", "violinist",
                    "chemist", "surveyor", "playwright", "astronomer", "weaver", "historian", "composer",
                    "physician", "shipwright", "clockmaker", "printer", "mathematician"],
    "city_desc": ["market town", "port", "mountain town", "river town", "mining town", "cathedral city",
                  "garrison town", "fishing town"],
    "company_desc": ["shipping", "textiles", "printing", "glassware", "instruments", "brewing", "ironworks",
                     "medicines", "insurance", "clocks", "machinery", "porcelain"],
    "band_desc": ["folk", "rock", "jazz", "brass", "choral", "electronic", "blues", "punk", "chamber", "pop"],
    "town_adj": ["harbour", "mountain", "river", "market", "mining", "border", "garrison", "fishing"],
    "firm_suffix": ["Works", "Industries", "Holdings", "Labs", "Systems", "Trading", "Foundry", "Mills"],
    "band_suffix": ["Quartet", "Collective", "Ensemble", "Choir", "Orchestra", "Trio", "Sextet", "Brothers"],
    "title_adj": ["Amber", "Silent", "Broken", "Golden", "Hollow", "Crimson", "Distant", "Winter", "Northern",
                  "Burning", "Sleeping", "Silver", "Forgotten", "Painted", "Iron", "Glass", "Wandering",
                  "Quiet", "Scarlet", "Frozen", "Hidden", "Last", "Bitter", "Velvet", "Drowned", "Eastern",
                  "Salt", "Paper", "Lonely", "Restless"],
    "title_noun": ["Gate", "Harbour", "Garden", "Lantern", "Orchard", "Tower", "Meadow", "Mirror", "Compass",
                   "Chapel", "River", "Crown", "Bridge", "Window", "Shore", "Island", "Letter", "Season",
                   "Forest", "Engine", "Voyage", "Feather", "Clock", "Mountain", "Anchor", "Candle", "Road",
                   "Kingdom", "Archive", "Valley"],
    "goods": ["copper", "wool", "salt", "timber", "silk", "amber", "tin", "linen", "honey", "tobacco", "pottery",
              "marble", "leather", "cheese", "wine", "coal", "iron", "paper", "glass", "rope", "barley", "cider",
              "lace", "furs", "saffron", "dyes", "soap", "candles", "herring", "oysters", "slate", "granite",
              "walnuts", "olives", "hops", "flax", "pepper", "indigo", "pearls", "carpets"],
}


@dataclass(frozen=True)
class Passage:
    id: str
    title: str
    text: str


@dataclass(frozen=True)
class QAExample:
    question: str
    answers: list[str]
    gold_passage_id: str
    entity: str  # the subject's name (the question mentions it); not written to the QA files
    relation: str


@dataclass
class World:
    seed: int
    passages: list[Passage]
    train: list[QAExample]
    dev: list[QAExample]
    test: list[QAExample]


@dataclass
class _Entity:
    kind: str
    name: str
    shorts: list[str]  # how later sentences refer to it: surname, "the firm", ...
    gender: str  # "m" / "f" for people, "n" otherwise
    desc: str
    facts: dict[str, str] = field(default_factory=dict)
    mentions: list[str] = field(default_factory=list)  # sentences naming other entities


# ---------------------------------------------------------------- invented vocabulary


def _template_words() -> set[str]:
    """Every lowercase English word the templates use: invented names must avoid them."""
    texts = [t for rels in RELATIONS.values() for r in rels.values() for ts in r[1:] for t in ts]
    texts += [t for ts in list(FILLERS.values()) + list(INTROS.values()) for t in ts]
    texts += [t for ms in MENTIONS.values() for _, t in ms]
    texts += [w for ws in WORDS.values() for w in ws]
    return {w.lower() for t in texts for w in re.findall(r"[A-Za-z]+", t)}


def _syllables(rng: random.Random, n: int) -> list[str]:
    """An inventory of `n` distinct syllables ("vel", "mo", "ra") that every invented name uses.

    A small inventory makes names share pieces ("Velmora", "Moravel"), so matching a name
    takes more than a bag of subword pieces: the room contrastive retriever training needs.
    """
    out: list[str] = []
    while len(out) < n:
        syl = rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)
        if syl not in out:
            out.append(syl)
    return out


def _invent(rng: random.Random, n: int, taken: set[str], inventory: list[str]) -> list[str]:
    """`n` new capitalised words of 2-3 syllables from `inventory`, none already in `taken`."""
    out: list[str] = []
    for _ in range(200 * n + 1000):
        if len(out) == n:
            return out
        word = "".join(rng.choice(inventory) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if len(word) >= 4 and word.lower() not in taken:
            taken.add(word.lower())
            out.append(word)
    raise ValueError(f"{len(inventory)} syllables cannot make {n} new names; raise n_syllables")


def _counts(n_entities: int) -> dict[str, int]:
    """Entities per kind; the last kind takes the rounding remainder."""
    if n_entities < 20:
        raise ValueError(f"n_entities={n_entities} is too small for a world (need >= 20)")
    kinds = list(KIND_SHARE)
    counts = {k: round(n_entities * KIND_SHARE[k]) for k in kinds[:-1]}
    counts[kinds[-1]] = n_entities - sum(counts.values())
    return counts


def _lookalike(rng: random.Random, name: str, taken: set[str], mutable: Sequence[int]) -> str | None:
    """`name` with one vowel of one invented word changed ("Velmora Quist" -> "Velmora Quast")."""
    words = name.split()
    for _ in range(50):
        i = rng.choice(mutable)
        spots = [j for j, ch in enumerate(words[i]) if ch.lower() in "aeiou"]
        j = rng.choice(spots)
        word = words[i][:j] + rng.choice([v for v in "aeiou" if v != words[i][j].lower()]) + words[i][j + 1:]
        if word.lower() not in taken:
            taken.add(word.lower())
            return " ".join(words[:i] + [word.capitalize()] + words[i + 1:])
    return None


def _names(rng: random.Random, count: int, new_name, taken: set[str], lookalikes: int,
           mutable: Sequence[int]) -> list[str]:
    """`count` distinct names in clusters: a fresh name and `lookalikes` one-vowel variants of it."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < count:
        base = new_name()
        for name in [base] + [_lookalike(rng, base, taken, mutable) for _ in range(lookalikes)]:
            if name is not None and name not in seen and len(names) < count:
                seen.add(name)
                names.append(name)
    return names


def _make_entities(rng: random.Random, n_entities: int, name_share: int, n_syllables: int,
                   lookalikes: int, mentions: int, value_pool: int = 0,
                   fact_rng: random.Random | None = None) -> list[_Entity]:
    """Named entities of every kind, then their facts (values point at other entities).

    Similar names are the retriever's hard negatives, so that matching a bag of subword pieces
    is not enough: every given name, surname and firm/band word is shared by ~`name_share`
    entities, all names come from a small syllable inventory, and names come in clusters of
    `lookalikes` + 1 that differ by one vowel ("Velmora Quist", "Velmora Quast"). Each passage
    also names `mentions` other entities in passing, so a name is found in many passages.
    `value_pool` > 0 draws each kind of fact value (towns, years of a range, people named as
    mentors or founders, ...) from that many items only, so every answer is a word a reader
    trained from scratch meets often: it learns to find the value, not to spell a rare name.
    Facts and mentions are drawn from `fact_rng` (default `rng`): another one gives the same
    entities, names and answer pools with other facts.
    """
    counts = _counts(n_entities)
    taken, syl = _template_words(), _syllables(rng, n_syllables)
    n_p = counts["person"]
    given, surnames = (_invent(rng, max(8, n_p // name_share), taken, syl) for _ in range(2))
    persons = _names(rng, n_p, lambda: f"{rng.choice(given)} {rng.choice(surnames)}", taken, lookalikes, (0, 1))
    towns = _names(rng, counts["city"], lambda: _invent(rng, 1, taken, syl)[0], taken, lookalikes, (0,))
    ents = [_Entity("person", n, [n.split()[1]] * 2 + [n], rng.choice("mf"), rng.choice(WORDS["person_desc"]))
            for n in persons]
    ents += [_Entity("city", n, [n, n, "the town"], "n", rng.choice(WORDS["city_desc"])) for n in towns]
    for kind, suffixes, own in (("company", "firm_suffix", ["the firm", "the company"]),
                                ("band", "band_suffix", ["the band", "the group"])):
        words = _invent(rng, max(-(-2 * counts[kind] // 8), counts[kind] // name_share), taken, syl)
        names = _names(rng, counts[kind], lambda: f"{rng.choice(words)} {rng.choice(WORDS[suffixes])}",
                       taken, lookalikes, (0,))
        ents += [_Entity(kind, n, [n] + own, "n", rng.choice(WORDS[kind + "_desc"])) for n in names]
    # Rivers and products are only ever answers: a wide inventory keeps them apart from names.
    value_syl = _syllables(rng, 40)
    rivers, products = (_invent(rng, max(20, counts[k]), taken, value_syl) for k in ("city", "company"))
    values = {
        "person": persons, "company": [e.name for e in ents if e.kind == "company"],
        "city": towns + _invent(rng, counts["city"] // 2 + 10, taken, syl),  # some towns have no passage
        "river": rivers, "product": products, "goods": WORDS["goods"],
        "title": [f"The {a} {n}" for a in WORDS["title_adj"] for n in WORDS["title_noun"]],
    }
    if value_pool > 0:
        years = {spec[0] for rels in RELATIONS.values() for spec in rels.values() if spec[0].startswith("year:")}
        for kind in years:
            lo, hi = (int(x) for x in kind[5:].split("-"))
            values[kind] = [str(y) for y in range(lo, hi + 1)]
        values = {k: sorted(rng.sample(v, min(len(v), value_pool))) for k, v in sorted(values.items())}
    by_kind = {k: [e.name for e in ents if e.kind == k] for k in KIND_SHARE}
    rng = fact_rng or rng
    for e in ents:
        for rel, spec in RELATIONS[e.kind].items():
            e.facts[rel] = _draw_value(rng, spec[0], values, e.name)
        for _ in range(mentions):
            kind, template = rng.choice(MENTIONS[e.kind])
            e.mentions.append(_fill(template, e, rng, other=_draw_value(rng, kind, by_kind, e.name)))
    return ents


def _draw_value(rng: random.Random, value_kind: str, values: dict[str, list[str]], subject: str) -> str:
    """A fact's value: a year from the kind's range ("year:1600-2000") or an item of a pool."""
    if value_kind.startswith("year:") and value_kind not in values:
        lo, hi = (int(x) for x in value_kind[5:].split("-"))
        return str(rng.randint(lo, hi))
    while True:
        v = rng.choice(values[value_kind])
        if v != subject:  # nobody is their own mentor, no town its own twin
            return v


# ---------------------------------------------------------------- passages and questions


def _fill(template: str, e: _Entity, rng: random.Random, value: str = "", other: str = "") -> str:
    he, his = {"m": ("he", "his"), "f": ("she", "her"), "n": ("it", "its")}[e.gender]
    s = template.format(name=e.name, short=rng.choice(e.shorts), he=he, his=his, v=value, o=other,
                        desc=e.desc, adj=rng.choice(WORDS["town_adj"]))
    s = re.sub(r"\b([Aa]) (?=[aeiou])", r"\1n ", s)  # "a engineer" -> "an engineer"
    return s[0].upper() + s[1:]


def _article(rng: random.Random, e: _Entity, min_words: int, max_words: int,
             chunks: int = 1) -> list[tuple[str, list[str]]]:
    """The entity's article as `chunks` passages -> [(text, relations it states)].

    Intro, the facts and mentions in random order, generic filler sentences until each passage
    has `min_words`..`max_words` words. With `chunks` > 1 the facts are dealt round-robin over
    the passages (more passages than facts: some hold none), the intro opening the first, as DPR
    cut each Wikipedia article into 100-word passages that all carry the article's title: a
    question's gold passage is then one of several about its entity, and telling them apart
    takes the relation, not the name.
    """
    facts = [(rel, _fill(rng.choice(RELATIONS[e.kind][rel][1]), e, rng, v)) for rel, v in e.facts.items()]
    facts += [("", m) for m in e.mentions]
    rng.shuffle(facts)
    fillers = [_fill(t, e, rng) for t in rng.sample(FILLERS[e.kind], len(FILLERS[e.kind]))]
    out = []
    for c in range(chunks):
        part, own = facts[c::chunks], fillers[c::chunks]  # every passage gets fillers of its own
        target = rng.randint(min_words, max_words)
        sentences = ([_fill(rng.choice(INTROS[e.kind]), e, rng)] if c == 0 else []) + [s for _, s in part]
        while own and sum(len(s.split()) for s in sentences) < target:
            sentences.insert(rng.randint(1 if c == 0 else 0, len(sentences)), own.pop())
        out.append((" ".join(sentences), [rel for rel, _ in part if rel]))
    return out


def _question(rng: random.Random, e: _Entity, rel: str, pid: str) -> QAExample:
    value = e.facts[rel]
    text = _fill(rng.choice(RELATIONS[e.kind][rel][2]), e, rng)
    if re.search(rf"\b{re.escape(value.lower())}\b", text.lower()):
        raise AssertionError(f"question {text!r} gives its answer {value!r} away")
    return QAExample(text, [value], pid, e.name, rel)


def _questions(rng: random.Random, ents: list[_Entity], pids: list[dict[str, str]], n: int, per_entity: int,
               split: str) -> list[QAExample]:
    """`n` questions (-1: all), at most `per_entity` about each entity, relations drawn without repeats."""
    pairs = [(i, rel) for i in range(len(ents))
             for rel in rng.sample(list(ents[i].facts), min(per_entity, len(ents[i].facts)))]
    n = len(pairs) if n < 0 else n
    if len(pairs) < n:
        raise ValueError(f"{split}: {len(ents)} entities give only {len(pairs)} questions, {n} asked")
    return [_question(rng, ents[i], rel, pids[i][rel]) for i, rel in rng.sample(pairs, n)]


def make_world(seed: int = 0, n_entities: int = 1500, n_train: int = 3000, n_dev: int = 100,
               n_test: int = 250, heldout_per_entity: int = 2, name_share: int = 6,
               n_syllables: int = 12, lookalikes: int = 3, mentions: int = 2, min_words: int = 85,
               max_words: int = 115, value_pool: int = 0, fact_seed: int = -1, chunks: int = 1) -> World:
    """A deterministic world: passages (`chunks` per entity) and train/dev/test questions.

    Dev and test entities are disjoint from each other and from every training question's
    entity; each held-out entity gets at most `heldout_per_entity` questions (spread over many
    entities). Passage ids are "1".."n" as in psgs_w100.tsv, in shuffled entity order (an
    entity's passages consecutive, as an article's in psgs_w100.tsv).
    `fact_seed` >= 0 re-draws everything after the names from that seed: the same entities and
    vocabulary with other facts, passages and questions (the demo's reader pretraining data).
    """
    rng = random.Random(seed)
    fact_rng = random.Random(fact_seed) if fact_seed >= 0 else None
    ents = _make_entities(rng, n_entities, name_share, n_syllables, lookalikes, mentions, value_pool, fact_rng)
    rng = fact_rng or rng
    rng.shuffle(ents)
    if not 1 <= chunks <= len(FILLERS["person"]) // 2:
        raise ValueError(f"chunks={chunks}: 1..{len(FILLERS['person']) // 2} passages per entity")
    passages, pids = [], []  # pids[i]: relation -> id of the passage of entity i that states it
    for e in ents:
        pids.append({})
        for text, rels in _article(rng, e, min_words, max_words, chunks):
            passages.append(Passage(str(len(passages) + 1), e.name, text))
            pids[-1].update(dict.fromkeys(rels, passages[-1].id))
    order = rng.sample(range(len(ents)), len(ents))
    n_dev_e, n_test_e = -(-n_dev // heldout_per_entity), -(-n_test // heldout_per_entity)
    if n_dev_e + n_test_e >= len(ents):
        raise ValueError(f"{n_dev} dev + {n_test} test questions need more than {len(ents)} entities")
    groups = [order[:n_dev_e], order[n_dev_e:n_dev_e + n_test_e], order[n_dev_e + n_test_e:]]
    splits = []
    for split, idx, n, per in (("dev", groups[0], n_dev, heldout_per_entity),
                               ("test", groups[1], n_test, heldout_per_entity),
                               ("train", groups[2], n_train, max(map(len, RELATIONS.values())))):
        splits.append(_questions(rng, [ents[i] for i in idx], [pids[i] for i in idx], n, per, split))
    return World(seed, passages, train=splits[2], dev=splits[0], test=splits[1])


# ---------------------------------------------------------------- writers (DPR's formats)


def _write_atomic(path: Path, text: str) -> None:
    """Write to a temporary name, then rename: a crash never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8", newline="") as f:
        f.write(text)
    os.replace(tmp, path)


def _tsv(rows: Iterable[Sequence[str]]) -> str:
    """Tab-separated rows as DPR's csv.reader(delimiter="\\t") reads them back."""
    buf = io.StringIO()
    writer = csv.writer(buf, delimiter="\t", lineterminator="\n")
    for row in rows:
        writer.writerow([re.sub(r"[\t\r\n]+", " ", c) for c in row])
    return buf.getvalue()


def _biencoder(qas: list[QAExample], by_id: dict[str, Passage]) -> str:
    records = [{
        "dataset": "demo_world",
        "question": qa.question,
        "answers": qa.answers,
        "positive_ctxs": [{"title": by_id[qa.gold_passage_id].title, "text": by_id[qa.gold_passage_id].text,
                           "passage_id": qa.gold_passage_id}],
        "negative_ctxs": [],
        "hard_negative_ctxs": [],
    } for qa in qas]
    return json.dumps(records, indent=2, ensure_ascii=False) + "\n"


def write_world(world: World, out_dir: str | os.PathLike) -> dict[str, Path]:
    """Write psgs.tsv, {train,dev,test}.jsonl, biencoder-{train,dev}.json, {dev,test}.qa.csv.

    Returns the written paths by file name.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_id = {p.id: p for p in world.passages}
    files = {"psgs.tsv": _tsv([("id", "text", "title")] + [(p.id, p.text, p.title) for p in world.passages])}
    for split in ("train", "dev", "test"):
        qas = getattr(world, split)
        files[f"{split}.jsonl"] = "".join(
            json.dumps({"question": q.question, "answers": q.answers, "gold_passage_id": q.gold_passage_id},
                       ensure_ascii=False) + "\n" for q in qas)
    files["biencoder-train.json"] = _biencoder(world.train, by_id)
    files["biencoder-dev.json"] = _biencoder(world.dev, by_id)
    for split in ("dev", "test"):  # DPR's qa.csv: question TAB python list literal of answers
        files[f"{split}.qa.csv"] = _tsv([(q.question, repr(list(q.answers))) for q in getattr(world, split)])
    paths = {}
    for name, text in files.items():
        _write_atomic(out / name, text)
        paths[name] = out / name
    return paths


# ---------------------------------------------------------------- generator tokenizer


def world_texts(world: World) -> list[str]:
    """Every string the generator can read or write: titles, passages, questions, answers."""
    texts = [t for p in world.passages for t in (p.title, p.text)]
    texts += [t for split in (world.train, world.dev, world.test) for q in split for t in [q.question] + q.answers]
    return texts


def build_word_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike | None = None,
                         lowercase: bool = True, model_max_length: int = 1024) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with BART's special tokens and pair template.

    The vocabulary is every word of `texts` (ids by descending count, ties alphabetical, so it is
    deterministic), after BART's `<s>`=0 `<pad>`=1 `</s>`=2 `<unk>`=3 `<mask>`=4. A few thousand
    words keep a from-scratch BART's embedding and softmax small enough to train on a CPU.
    `tokenizer(question, passage)` gives `<s> question </s> </s> passage </s>` as BART does.
    Saved with `save_pretrained(out_dir)` when `out_dir` is given.
    """
    norm = [normalizers.NFKC()] + ([normalizers.Lowercase()] if lowercase else [])
    normalizer, pre = normalizers.Sequence(norm), pre_tokenizers.Whitespace()
    counts: dict[str, int] = {}
    for text in texts:
        for word, _ in pre.pre_tokenize_str(normalizer.normalize_str(text)):
            counts[word] = counts.get(word, 0) + 1
    words = sorted((w for w in counts if w not in SPECIAL_TOKENS), key=lambda w: (-counts[w], w))
    vocab = {w: i for i, w in enumerate(SPECIAL_TOKENS + words)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", pair="<s> $A </s> </s> $B </s>", special_tokens=[("<s>", 0), ("</s>", 2)])
    tok.add_special_tokens(SPECIAL_TOKENS)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        mask_token="<mask>", cls_token="<s>", sep_token="</s>", model_max_length=model_max_length)
    if out_dir is not None:
        save_pretrained_beside(fast, out_dir)
    return fast


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Write the demo's synthetic world in DPR's formats.")
    ap.add_argument("out_dir")
    defaults = inspect.signature(make_world).parameters
    for name, param in defaults.items():  # every make_world knob, e.g. --n-entities 1000
        ap.add_argument("--" + name.replace("_", "-"), type=int, default=param.default)
    ap.add_argument("--tokenizer-dir", help="also build the generator's word-level tokenizer here")
    args = vars(ap.parse_args(argv))
    world = make_world(**{name: args[name] for name in defaults})
    paths = write_world(world, args["out_dir"])
    msg = f"{len(world.passages)} passages, {len(world.train)}/{len(world.dev)}/{len(world.test)} questions"
    if args["tokenizer_dir"]:
        msg += f", vocabulary {len(build_word_tokenizer(world_texts(world), args['tokenizer_dir']))}"
    print(f"{msg} -> {', '.join(str(p) for p in paths.values())}")


if __name__ == "__main__":
    main()
