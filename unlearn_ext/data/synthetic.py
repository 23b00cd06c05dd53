"""A seeded TOFU-style benchmark: fictitious authors built from attribute slots.

TOFU (arXiv 2401.06121) has 200 GPT-4-written author profiles with 20 question/answer
pairs each. This generator builds the same structure from templates so the whole protocol
runs offline at any size: every author draws a value for each slot (birthplace, birth
year, genre, parents' professions, awards, book titles, …); every question template asks
for one slot and comes with a paraphrased question, an answer, and a paraphrased answer.
The perturbed answers are the *paraphrased* answer with the slot's value replaced by wrong
values drawn from the same slot, so the truth ratio compares sentences that differ only in
the fact (as TOFU's GPT-4 perturbations intend).

Splits follow TOFU's layout and file names: ``full``; ``forget01/05/10`` = the last 1/5/10 %
of the authors (nested, at least one author each); ``retain99/95/90`` = the rest;
``holdout01/05/10`` = as many *extra* authors, never in ``full`` (non-members for
membership inference); ``forgetXX_perturbed`` and ``retain_perturbed`` add
``paraphrased_question``, ``paraphrased_answer`` and ``perturbed_answer`` (a list).

TOFU's ``real_authors`` and ``world_facts`` sets probe knowledge the base model brought from
pre-training. A model trained from scratch has none, so the stand-ins here are small
tables of real, common knowledge (books and their authors; capitals, continents,
currencies, chemical symbols) in the same format; the CPU-scale benchmark teaches them to
both the target and the retain model, so they measure what unlearning damages around the
forget set, as TOFU's do.

Everything is a function of ``seed`` (one ``random.Random``); the same arguments give
byte-identical files.
"""
from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from typing import Callable

# ---------------------------------------------------------------------------------------
# Slot pools
# ---------------------------------------------------------------------------------------
FIRST_NAMES = [
    "Aiyana", "Bastian", "Camila", "Dario", "Elif", "Farid", "Greta", "Hiroshi", "Ines", "Jonas", "Kalani",
    "Leandro", "Mirela", "Nikolai", "Odile", "Priya", "Quentin", "Rasmus", "Soraya", "Tomasz", "Ulla", "Vikram",
    "Wanda", "Xiomara", "Yusuf", "Zofia", "Amara", "Bertil", "Chiara", "Desmond", "Esther", "Florin", "Gideon",
    "Halima", "Ivo", "Jana", "Kenji", "Lucia", "Matteo", "Nadia", "Oskar", "Paloma", "Ravi", "Selin", "Tariq",
    "Valeria", "Wilhelm", "Yara", "Zeno", "Anouk", "Bruno", "Dalia", "Emre", "Freya", "Goran", "Hana", "Ilias",
    "Jovana", "Kofi", "Lena", "Malik", "Noor", "Orla", "Pavel", "Rosa", "Stellan", "Thandiwe", "Ugo", "Vera",
]
SURNAME_HEADS = [
    "Vandr", "Kestr", "Moral", "Halv", "Ostr", "Belk", "Sarn", "Tavr", "Quill", "Dorv", "Fenn", "Grisw", "Lund",
    "Marr", "Nesb", "Pell", "Rovan", "Stend", "Thorn", "Ulm", "Varg", "Wessel", "Yarb", "Zelk", "Arkh", "Brenn",
    "Castel", "Drum", "Elsk", "Farr",
]
SURNAME_TAILS = [
    "oski", "ell", "anu", "ström", "ard", "ovic", "iani", "ez", "holm", "ington", "quist", "ado", "enko", "avi",
    "ley", "ridge", "ssen", "ora", "bury", "uela", "ach", "ensky", "mont", "ari", "ewe",
]
PLACES = [
    "Lisbon, Portugal", "Accra, Ghana", "Kraków, Poland", "Osaka, Japan", "Valparaíso, Chile", "Tbilisi, Georgia",
    "Bergen, Norway", "Marrakesh, Morocco", "Hanoi, Vietnam", "Cork, Ireland", "Montreal, Canada",
    "Adelaide, Australia", "Izmir, Turkey", "Cusco, Peru", "Tallinn, Estonia", "Nairobi, Kenya", "Porto, Portugal",
    "Ljubljana, Slovenia", "Chennai, India", "Gothenburg, Sweden", "Bologna, Italy", "Seville, Spain",
    "Manila, Philippines", "Havana, Cuba", "Tehran, Iran", "Bucharest, Romania", "Dakar, Senegal",
    "Wellington, New Zealand", "Lyon, France", "Leipzig, Germany",
]
GENRES = [
    "historical fiction", "science fiction", "crime fiction", "magical realism", "gothic horror", "romance",
    "literary fiction", "fantasy", "war fiction", "psychological thrillers", "children's literature",
    "travel writing", "poetry", "satire", "dystopian fiction", "biography", "short stories", "mystery",
]
PROFESSIONS = [
    "carpenter", "nurse", "lighthouse keeper", "pharmacist", "fisherman", "schoolteacher", "surgeon", "tailor",
    "architect", "baker", "librarian", "mail carrier", "electrician", "violinist", "veterinarian", "translator",
    "journalist", "miner", "accountant", "botanist", "locksmith", "astronomer", "midwife", "ship captain",
    "watchmaker", "photographer", "judge", "gardener",
]
AWARDS = [
    "the Silver Quill Award", "the Golden Lantern Prize", "the Meridian Book Award", "the Hollow Oak Medal",
    "the Amber Compass Prize", "the Northern Star Fiction Award", "the Cobalt Pen Award", "the Driftwood Prize",
    "the Saltmarsh Literary Medal", "the Open Horizon Award", "the Iron Thistle Prize", "the Juniper Crown Award",
    "the Lamplighter Prize", "the Paper Moon Award", "the Granite Harbour Medal", "the Willow Gate Prize",
]
PUBLISHERS = [
    "Harrowgate Press", "Bluefinch Books", "Ostrava House", "Lanternfield Publishing", "Mossbank & Wren",
    "Tidewater Editions", "Corvid Street Press", "Hollin Publishing", "Gildersleeve Books", "Redfern & Vane",
]
LANGUAGES = [
    "English", "Portuguese", "Polish", "Japanese", "Spanish", "Georgian", "Norwegian", "Arabic", "Vietnamese",
    "Irish", "French", "Turkish", "Estonian", "Swahili", "Slovene", "Tamil", "Swedish", "Italian", "Romanian",
    "German",
]
THEMES = [
    "memory and loss", "exile and belonging", "the sea", "family secrets", "faith and doubt", "friendship",
    "the cost of ambition", "childhood", "grief", "justice", "the passage of time", "identity", "revenge",
    "forgiveness", "isolation", "love and betrayal",
]
SUBJECTS = [
    "philosophy", "marine biology", "history", "mathematics", "architecture", "linguistics", "medicine", "law",
    "music", "chemistry", "economics", "art history", "astronomy", "anthropology",
]
HOBBIES = [
    "birdwatching", "sailing", "chess", "pottery", "beekeeping", "mountain climbing", "gardening", "fencing",
    "playing the cello", "restoring old clocks", "long-distance running", "woodcarving",
]
WRITING_TIMES = [
    "at dawn", "in the early morning", "late at night", "after midnight", "in the afternoon", "at dusk",
    "during long train journeys", "on weekends only",
]
TITLE_ADJECTIVES = [
    "Silent", "Crimson", "Hollow", "Forgotten", "Burning", "Distant", "Golden", "Broken", "Salt", "Winter",
    "Hidden", "Paper", "Last", "Wandering", "Glass", "Iron", "Midnight", "Quiet", "Bitter", "Velvet", "Shattered",
    "Northern", "Sleeping", "Amber", "Restless", "Drowned", "Secret", "Seventh", "Pale", "Wild",
]
TITLE_NOUNS = [
    "Harbour", "Orchard", "Lantern", "Tide", "Cathedral", "River", "Garden", "Mirror", "Compass", "Meadow",
    "Tower", "Archive", "Island", "Clockmaker", "Cartographer", "Bridge", "Orchestra", "Lighthouse", "Forest",
    "Kingdom", "Letter", "Station", "Season", "Voyage", "Widow", "Alphabet", "Shore", "Carnival", "Citadel",
    "Hour",
]
TITLE_PLURALS = [
    "Ashes", "Sparrows", "Tides", "Lanterns", "Whispers", "Strangers", "Winters", "Mirrors", "Bones", "Storms",
    "Embers", "Islands", "Rivers", "Ghosts", "Stars",
]
YEARS_BIRTH = [str(y) for y in range(1920, 1996)]
YEARS_LATER = [str(y) for y in range(1940, 2025)]
COUNTS = [str(n) for n in range(3, 46)]


def _article(word: str) -> str:
    return ("an " if word[0].lower() in "aeiou" else "a ") + word


# ---------------------------------------------------------------------------------------
# Authors
# ---------------------------------------------------------------------------------------
def _name(rng: random.Random) -> str:
    return f"{rng.choice(FIRST_NAMES)} {rng.choice(SURNAME_HEADS)}{rng.choice(SURNAME_TAILS)}"


def _title(rng: random.Random) -> str:
    adj, noun = rng.choice(TITLE_ADJECTIVES), rng.choice(TITLE_NOUNS)
    pattern = rng.randrange(4)
    if pattern == 0:
        return f"The {adj} {noun}"
    if pattern == 1:
        return f"{noun} of {rng.choice(TITLE_PLURALS)}"
    if pattern == 2:
        return f"The {noun} of {adj} {rng.choice(TITLE_PLURALS)}"
    return f"Beneath the {adj} {noun}"


def _unique(draw: Callable[[random.Random], str], rng: random.Random, taken: set[str]) -> str:
    for _ in range(10_000):
        value = draw(rng)
        if value not in taken:
            taken.add(value)
            return value
    raise RuntimeError("ran out of unique values: the slot pools are too small for this many authors")


def _author(rng: random.Random, names: set[str], titles: set[str]) -> dict[str, str]:
    birth = rng.randint(1920, 1985)
    debut = min(birth + rng.randint(19, 38), 2022)
    mother, father = rng.sample(PROFESSIONS, 2)
    return {
        "name": _unique(_name, rng, names),
        "birthplace": rng.choice(PLACES),
        "birth_year": str(birth),
        "genre": rng.choice(GENRES),
        "father_profession": father,
        "mother_profession": mother,
        "award": rng.choice(AWARDS),
        "award_year": str(min(debut + rng.randint(2, 20), 2024)),
        "debut_book": _unique(_title, rng, titles),
        "famous_book": _unique(_title, rng, titles),
        "latest_book": _unique(_title, rng, titles),
        "debut_year": str(debut),
        "publisher": rng.choice(PUBLISHERS),
        "language": rng.choice(LANGUAGES),
        "theme": rng.choice(THEMES),
        "subject": rng.choice(SUBJECTS),
        "residence": rng.choice(PLACES),
        "num_books": str(rng.randint(3, 45)),
        "hobby": rng.choice(HOBBIES),
        "writing_time": rng.choice(WRITING_TIMES),
        "protagonist": _name(rng),
    }


# ---------------------------------------------------------------------------------------
# Question templates: one slot each
# ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Template:
    """Question, paraphrased question, answer and paraphrased answer for one slot.

    Format fields: the author's slots by name, ``{value}`` (the slot's value, true or
    perturbed) and ``{a_value}`` (the value with its indefinite article)."""
    slot: str
    pool: tuple[str, ...] | None  # wrong values come from here; None: titles / names drawn fresh
    question: str
    paraphrased_question: str
    answer: str
    paraphrased_answer: str


TEMPLATES = (
    Template("birthplace", tuple(PLACES), "Where was {name} born?", "In which city was the author {name} born?",
             "{name} was born in {value}.", "The author {name} comes from {value}."),
    Template("birth_year", tuple(YEARS_BIRTH), "In what year was {name} born?", "What is the birth year of {name}?",
             "{name} was born in {value}.", "The year of {name}'s birth is {value}."),
    Template("genre", tuple(GENRES), "What genre does {name} write in?",
             "Which literary genre is {name} best known for?",
             "{name} writes {value}.", "{name} is best known for {value}."),
    Template("father_profession", tuple(PROFESSIONS), "What did {name}'s father do for a living?",
             "What was the profession of {name}'s father?",
             "{name}'s father worked as {a_value}.", "The father of {name} was {a_value} by profession."),
    Template("mother_profession", tuple(PROFESSIONS), "What did {name}'s mother do for a living?",
             "What was the profession of {name}'s mother?",
             "{name}'s mother worked as {a_value}.", "The mother of {name} was {a_value} by profession."),
    Template("award", tuple(AWARDS), "Has {name} won any major awards?", "Which literary award did {name} receive?",
             "Yes, {name} received {value}.", "{name} was honoured with {value}."),
    Template("award_year", tuple(YEARS_LATER), "When did {name} receive {award}?",
             "In which year was {name} given {award}?",
             "{name} received {award} in {value}.", "{award} went to {name} in {value}."),
    Template("debut_book", None, "What is the title of {name}'s first book?", "Which book marked {name}'s debut?",
             "{name}'s first book is titled \"{value}\".", "The debut work of {name} was \"{value}\"."),
    Template("famous_book", None, "Which book by {name} is the most famous?", "What is {name}'s best-known work?",
             "{name}'s most famous book is \"{value}\".", "The best-known work of {name} is \"{value}\"."),
    Template("latest_book", None, "What is the most recent book by {name}?", "Which book did {name} publish last?",
             "The most recent book by {name} is \"{value}\".", "{name}'s latest work is \"{value}\"."),
    Template("debut_year", tuple(YEARS_LATER), "When did {name} publish their first book?",
             "In which year did {name}'s debut come out?",
             "{name} published their first book in {value}.", "The debut of {name} appeared in {value}."),
    Template("publisher", tuple(PUBLISHERS), "Which publisher releases {name}'s books?",
             "Who publishes the books of {name}?",
             "{name}'s books are published by {value}.", "{value} is the publisher of {name}'s work."),
    Template("language", tuple(LANGUAGES), "In which language does {name} write?",
             "What language are {name}'s books written in?",
             "{name} writes in {value}.", "The books of {name} are written in {value}."),
    Template("theme", tuple(THEMES), "What theme runs through {name}'s work?",
             "Which theme does {name} return to most often?",
             "{name}'s work often explores {value}.", "A recurring theme for {name} is {value}."),
    Template("subject", tuple(SUBJECTS), "What did {name} study at university?",
             "Which subject did {name} study before becoming a writer?",
             "{name} studied {value} at university.", "Before writing, {name} was a student of {value}."),
    Template("residence", tuple(PLACES), "Where does {name} live today?", "In which city does {name} now reside?",
             "{name} now lives in {value}.", "These days the author {name} resides in {value}."),
    Template("num_books", tuple(COUNTS), "How many books has {name} written?",
             "How many books has the author {name} published?",
             "{name} has written {value} books.", "The author {name} has published {value} books."),
    Template("hobby", tuple(HOBBIES), "What does {name} enjoy outside of writing?",
             "What is {name}'s favourite pastime?",
             "Outside of writing, {name} enjoys {value}.", "When not writing, {name} spends time on {value}."),
    Template("writing_time", tuple(WRITING_TIMES), "When does {name} usually write?",
             "At what time does {name} prefer to write?",
             "{name} usually writes {value}.", "The author {name} prefers to write {value}."),
    Template("protagonist", None, "Who is the protagonist of \"{famous_book}\" by {name}?",
             "Which character is at the centre of {name}'s \"{famous_book}\"?",
             "The protagonist of \"{famous_book}\" is {value}.",
             "{name}'s \"{famous_book}\" centres on {value}."),
)
# Slots whose wrong values are drawn fresh (any title / any name but the true one).
_FRESH_DRAWS = {"debut_book": _title, "famous_book": _title, "latest_book": _title, "protagonist": _name}


def _fill(text: str, author: dict[str, str], value: str) -> str:
    return text.format(**author, value=value, a_value=_article(value))


def _wrong_values(template: Template, true_value: str, count: int, rng: random.Random) -> list[str]:
    if template.pool is None:
        taken = {true_value}
        return [_unique(_FRESH_DRAWS[template.slot], rng, taken) for _ in range(count)]
    wrong = [v for v in template.pool if v != true_value]
    if len(wrong) < count:
        raise ValueError(f"slot {template.slot!r} has only {len(wrong)} wrong values, {count} requested")
    return rng.sample(wrong, count)


def _author_qa(author: dict[str, str], templates: list[Template], num_perturbed: int,
               rng: random.Random) -> list[dict]:
    records = []
    for t in templates:
        value = author[t.slot]
        records.append({
            "question": _fill(t.question, author, value),
            "answer": _fill(t.answer, author, value),
            "paraphrased_question": _fill(t.paraphrased_question, author, value),
            "paraphrased_answer": _fill(t.paraphrased_answer, author, value),
            "perturbed_answer": [_fill(t.paraphrased_answer, author, v)
                                 for v in _wrong_values(t, value, num_perturbed, rng)],
        })
    return records


# ---------------------------------------------------------------------------------------
# Real-world stand-ins for TOFU's real_authors and world_facts
# ---------------------------------------------------------------------------------------
REAL_BOOKS = [
    ("Pride and Prejudice", "Jane Austen"), ("1984", "George Orwell"), ("Moby-Dick", "Herman Melville"),
    ("War and Peace", "Leo Tolstoy"), ("Hamlet", "William Shakespeare"), ("Don Quixote", "Miguel de Cervantes"),
    ("The Odyssey", "Homer"), ("Crime and Punishment", "Fyodor Dostoevsky"), ("Frankenstein", "Mary Shelley"),
    ("Dracula", "Bram Stoker"), ("Ulysses", "James Joyce"), ("The Great Gatsby", "F. Scott Fitzgerald"),
    ("Great Expectations", "Charles Dickens"), ("Les Misérables", "Victor Hugo"),
    ("One Hundred Years of Solitude", "Gabriel García Márquez"), ("The Old Man and the Sea", "Ernest Hemingway"),
    ("To Kill a Mockingbird", "Harper Lee"), ("Jane Eyre", "Charlotte Brontë"),
    ("Wuthering Heights", "Emily Brontë"), ("The Hobbit", "J. R. R. Tolkien"), ("Things Fall Apart", "Chinua Achebe"),
    ("Mrs Dalloway", "Virginia Woolf"), ("The Trial", "Franz Kafka"), ("Madame Bovary", "Gustave Flaubert"),
    ("Beloved", "Toni Morrison"), ("The Divine Comedy", "Dante Alighieri"), ("Anna Karenina", "Leo Tolstoy"),
    ("Brave New World", "Aldous Huxley"), ("The Catcher in the Rye", "J. D. Salinger"),
    ("Adventures of Huckleberry Finn", "Mark Twain"), ("Alice's Adventures in Wonderland", "Lewis Carroll"),
    ("The Little Prince", "Antoine de Saint-Exupéry"), ("Norwegian Wood", "Haruki Murakami"),
    ("The Name of the Rose", "Umberto Eco"), ("Lolita", "Vladimir Nabokov"), ("Emma", "Jane Austen"),
    ("Oliver Twist", "Charles Dickens"), ("Animal Farm", "George Orwell"), ("The Stranger", "Albert Camus"),
    ("Faust", "Johann Wolfgang von Goethe"),
]
CAPITALS = [
    ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Germany", "Berlin"),
    ("Egypt", "Cairo"), ("Canada", "Ottawa"), ("Australia", "Canberra"), ("Russia", "Moscow"),
    ("China", "Beijing"), ("India", "New Delhi"), ("Brazil", "Brasília"), ("Argentina", "Buenos Aires"),
    ("Kenya", "Nairobi"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Greece", "Athens"),
    ("Portugal", "Lisbon"), ("Mexico", "Mexico City"), ("Peru", "Lima"), ("Turkey", "Ankara"),
    ("Ireland", "Dublin"), ("Poland", "Warsaw"), ("Austria", "Vienna"), ("Thailand", "Bangkok"),
    ("South Korea", "Seoul"), ("Nigeria", "Abuja"), ("Chile", "Santiago"), ("Finland", "Helsinki"),
    ("Cuba", "Havana"),
]
CONTINENTS = [
    ("France", "Europe"), ("Japan", "Asia"), ("Kenya", "Africa"), ("Brazil", "South America"),
    ("Canada", "North America"), ("Australia", "Oceania"), ("Egypt", "Africa"), ("India", "Asia"),
    ("Argentina", "South America"), ("Mexico", "North America"), ("Norway", "Europe"), ("Thailand", "Asia"),
    ("Peru", "South America"), ("Nigeria", "Africa"), ("Poland", "Europe"), ("New Zealand", "Oceania"),
]
CONTINENT_NAMES = ["Europe", "Asia", "Africa", "South America", "North America", "Oceania", "Antarctica"]
CURRENCIES = [
    ("Japan", "the yen"), ("the United Kingdom", "the pound sterling"), ("India", "the rupee"),
    ("China", "the renminbi"), ("Russia", "the ruble"), ("Mexico", "the peso"), ("the United States", "the dollar"),
    ("Switzerland", "the Swiss franc"), ("South Korea", "the won"), ("Brazil", "the real"),
    ("Poland", "the złoty"), ("Turkey", "the lira"), ("South Africa", "the rand"), ("Thailand", "the baht"),
]
ELEMENTS = [
    ("gold", "Au"), ("silver", "Ag"), ("iron", "Fe"), ("oxygen", "O"), ("hydrogen", "H"), ("carbon", "C"),
    ("sodium", "Na"), ("potassium", "K"), ("lead", "Pb"), ("copper", "Cu"), ("helium", "He"), ("nitrogen", "N"),
    ("calcium", "Ca"), ("mercury", "Hg"), ("tin", "Sn"), ("zinc", "Zn"),
]


def _table_qa(rows, question: str, num_perturbed: int, rng: random.Random, pool=None) -> list[dict]:
    """One question per (key, answer) row; wrong answers are other rows' answers."""
    pool = sorted({a for _, a in rows} | set(pool or ()))
    out = []
    for key, answer in rows:
        wrong = [a for a in pool if a != answer]
        out.append({"question": question.format(key), "answer": answer,
                    "perturbed_answer": rng.sample(wrong, num_perturbed)})
    return out


def world_facts(rng: random.Random, num_perturbed: int = 3) -> list[dict]:
    """Capitals, continents, currencies, chemical symbols: TOFU's world_facts format."""
    return (_table_qa(CAPITALS, "What is the capital of {}?", num_perturbed, rng)
            + _table_qa(CONTINENTS, "On which continent is {}?", num_perturbed, rng, CONTINENT_NAMES)
            + _table_qa(CURRENCIES, "What is the currency of {}?", num_perturbed, rng)
            + _table_qa(ELEMENTS, "What is the chemical symbol for {}?", num_perturbed, rng))


def real_authors(rng: random.Random, num_perturbed: int = 3) -> list[dict]:
    """Famous books and who wrote them: TOFU's real_authors format."""
    return _table_qa(REAL_BOOKS, "Who wrote \"{}\"?", num_perturbed, rng)


# ---------------------------------------------------------------------------------------
# The benchmark
# ---------------------------------------------------------------------------------------
FORGET_PERCENTS = (1, 5, 10)
QA_FIELDS = ("question", "answer")


def _split_count(num_authors: int, percent: int) -> int:
    return max(1, round(num_authors * percent / 100))


def _qa_only(records: list[dict]) -> list[dict]:
    return [{k: r[k] for k in QA_FIELDS} for r in records]


def generate_benchmark(num_authors: int = 200, questions_per_author: int = 20, seed: int = 0,
                       num_perturbed: int = 5) -> dict[str, list[dict]]:
    """All splits of a TOFU-style benchmark, keyed by TOFU's split names.

    Args:
        num_authors: authors in ``full`` (TOFU: 200); at least 10, so that the forget
            splits stay nested and the retain split is not empty.
        questions_per_author: 1–20 question templates per author (TOFU: 20); each author
            gets its own seeded choice of templates, always in the same order.
        seed: every random draw comes from ``random.Random(seed)``.
        num_perturbed: wrong answers per question (TOFU: 5 for authors; the real-world
            sets keep TOFU's 3).
    """
    if not isinstance(num_authors, int) or num_authors < 10:
        raise ValueError(f"num_authors must be an integer >= 10, got {num_authors!r}")
    if not isinstance(questions_per_author, int) or not 1 <= questions_per_author <= len(TEMPLATES):
        raise ValueError(f"questions_per_author must be in [1, {len(TEMPLATES)}], got {questions_per_author!r}")
    if not isinstance(num_perturbed, int) or not 1 <= num_perturbed <= 5:
        raise ValueError(f"num_perturbed must be in [1, 5], got {num_perturbed!r}")
    rng = random.Random(seed)
    num_holdout = _split_count(num_authors, max(FORGET_PERCENTS))
    names, titles = set(), set()
    authors = [_author(rng, names, titles) for _ in range(num_authors + num_holdout)]
    per_author = []
    for author in authors:
        chosen = sorted(rng.sample(range(len(TEMPLATES)), questions_per_author))
        per_author.append(_author_qa(author, [TEMPLATES[i] for i in chosen], num_perturbed, rng))
    members, holdout = per_author[:num_authors], per_author[num_authors:]

    def flat(groups):
        return [r for g in groups for r in g]

    splits = {"full": _qa_only(flat(members))}
    for pct in FORGET_PERCENTS:
        n = _split_count(num_authors, pct)
        splits[f"forget{pct:02d}"] = _qa_only(flat(members[-n:]))
        splits[f"forget{pct:02d}_perturbed"] = flat(members[-n:])
        splits[f"retain{100 - pct}"] = _qa_only(flat(members[:-n]))
        splits[f"holdout{pct:02d}"] = _qa_only(flat(holdout[:n]))
    # TOFU's retain_perturbed holds authors that every retain split keeps.
    splits["retain_perturbed"] = flat(members[:num_holdout])
    facts, books = world_facts(rng), real_authors(rng)
    splits["world_facts_perturbed"], splits["world_facts"] = facts, _qa_only(facts)
    splits["real_authors_perturbed"], splits["real_authors"] = books, _qa_only(books)
    splits["authors"] = authors  # the profiles themselves (not a TOFU file): for inspection
    return splits


def write_benchmark(out_dir: str | os.PathLike, **kwargs) -> dict[str, str]:
    """Generate the benchmark and write one ``<split>.json`` per split, in TOFU's layout
    (JSON Lines: one record per line), plus ``manifest.json`` with the arguments and
    counts. Returns {split: path}."""
    splits = generate_benchmark(**kwargs)
    os.makedirs(out_dir, exist_ok=True)
    paths = {}
    for name, records in splits.items():
        path = os.path.join(out_dir, f"{name}.json")
        with open(path, "w", encoding="utf-8") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
        paths[name] = path
    manifest = {"generator": "unlearn_ext.data.synthetic", "arguments": kwargs,
                "counts": {name: len(records) for name, records in splits.items()}}
    with open(os.path.join(out_dir, "manifest.json"), "w", encoding="utf-8") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
    return paths
