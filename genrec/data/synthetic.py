"""Synthetic demo data: a catalogue with realistic text and users with tastes and sequential habits.

Items belong to categories and brands and come in ordered product lines (book series, skincare
routines, course levels), so the next item is often predictable from the last one: a sequence
model should beat popularity by a wide margin. Deterministic for a given seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from genrec.data.catalog import Catalog

# category -> (brands, line words, item nouns, step names, complementary category)
CATEGORIES: dict[str, tuple[list[str], list[str], list[str], list[str], str]] = {
    "Skincare": (
        ["Lumiere", "Dermaleaf", "Aquavera", "Solenne"],
        ["Hydra", "Glow", "Calm", "Pure", "Velvet", "Radiance"],
        ["Routine"],
        ["Cleanser", "Toner", "Serum", "Moisturizer", "Night Cream", "Eye Cream"],
        "Makeup",
    ),
    "Makeup": (
        ["Rougeline", "Petalia", "Noirelle", "Kiss&Co"],
        ["Matte", "Silk", "Bloom", "Nude", "Velour", "Studio"],
        ["Collection"],
        ["Primer", "Foundation", "Concealer", "Blush", "Mascara", "Setting Spray"],
        "Skincare",
    ),
    "Haircare": (
        ["Tressa", "Volumo", "Curlique", "Argana"],
        ["Repair", "Volume", "Curl", "Shine", "Color Safe"],
        ["System"],
        ["Shampoo", "Conditioner", "Hair Mask", "Leave-In", "Styling Oil"],
        "Skincare",
    ),
    "Fantasy Books": (
        ["Ember Press", "Oakshield", "Starfall House", "Runebound"],
        ["Dragon", "Shadow", "Crown", "Storm", "Silver", "Wolf", "Ash", "Frost"],
        ["Saga", "Chronicles", "Cycle"],
        ["Book 1", "Book 2", "Book 3", "Book 4", "Book 5", "Book 6"],
        "Board Games",
    ),
    "Mystery Books": (
        ["Inkwell", "Foggy Lane", "Quill & Key", "Midnight"],
        ["Harbor", "Manor", "Alley", "Orchid", "Raven", "Canal"],
        ["Mysteries", "Casebook"],
        ["Case 1", "Case 2", "Case 3", "Case 4", "Case 5"],
        "Tea",
    ),
    "Coffee": (
        ["Roastwell", "Bean Theory", "Altura", "Crema Co"],
        ["Espresso", "Morning", "Dark", "Single Origin"],
        ["Kit"],
        ["Beans", "Grinder", "Filter Papers", "Milk Frother", "Descaler"],
        "Kitchen",
    ),
    "Tea": (
        ["Leafhouse", "Jadeleaf", "Chai Lab", "Darjeel"],
        ["Green", "Oolong", "Chai", "Herbal", "Earl Grey"],
        ["Set"],
        ["Sampler", "Loose Leaf", "Teapot", "Infuser", "Honey"],
        "Mystery Books",
    ),
    "Running": (
        ["Stridex", "Tempo", "Trailfox", "Pacer"],
        ["Road", "Trail", "Marathon", "Sprint", "Tempo"],
        ["Gear"],
        ["Shoes", "Socks", "Shorts", "Energy Gels", "GPS Watch", "Foam Roller"],
        "Cycling",
    ),
    "Cycling": (
        ["Velocity", "Spoke&Co", "Gravelo", "Peloton Labs"],
        ["Road", "Gravel", "Commuter", "Climb"],
        ["Kit"],
        ["Helmet", "Gloves", "Bike Lights", "Water Bottle", "Saddle Bag", "Chain Lube"],
        "Running",
    ),
    "Board Games": (
        ["Meeple Works", "Dicetower", "Cardboard Co", "Tabletop Guild"],
        ["Castle", "Galaxy", "Harvest", "Pirate", "Railway", "Quest"],
        ["Game"],
        ["Base Game", "Expansion 1", "Expansion 2", "Expansion 3", "Card Sleeves"],
        "Fantasy Books",
    ),
    "Kitchen": (
        ["Cuisina", "Ironleaf", "Panhaus", "Copperline"],
        ["Chef", "Everyday", "Pro", "Rustic", "Nordic"],
        ["Series"],
        ["Skillet", "Saucepan", "Knife", "Cutting Board", "Dutch Oven", "Spatula"],
        "Coffee",
    ),
    "Programming Courses": (
        ["CodePath", "ByteAcademy", "DevForge", "Lambda School"],
        ["Python", "Rust", "SQL", "Go", "TypeScript", "Data Science"],
        ["Track"],
        ["Beginner", "Intermediate", "Advanced", "Projects", "Interview Prep"],
        "Board Games",
    ),
}
ADJECTIVES = [
    "Classic",
    "Premium",
    "Travel Size",
    "Limited Edition",
    "Eco",
    "Deluxe",
    "Essential",
    "Signature",
]


@dataclass(frozen=True)
class Line:
    """An ordered product line: consecutive items are each other's natural next purchase."""

    category: str
    items: tuple[int, ...]


def make_catalog(n_items: int, rng: np.random.Generator) -> tuple[Catalog, list[Line], np.ndarray]:
    """Items in product lines; returns the catalogue, the lines and each item's base popularity."""
    ids: list[str] = []
    titles: list[str] = []
    texts: list[str] = []
    attrs: list[dict[str, str]] = []
    lines: list[Line] = []
    cats = list(CATEGORIES)
    while len(ids) < n_items:
        cat = cats[len(lines) % len(cats)]
        brands, words, nouns, steps, _ = CATEGORIES[cat]
        brand, word, noun = rng.choice(brands), rng.choice(words), rng.choice(nouns)
        edition = rng.choice(ADJECTIVES)
        n_steps = int(rng.integers(3, len(steps) + 1))
        members = []
        for step in steps[:n_steps]:
            if len(ids) >= n_items:
                break
            row = len(ids)
            ids.append(f"I{row:05d}")
            title = f"{brand} {word} {noun} {edition}: {step}"
            titles.append(title)
            texts.append(
                f"{title}. Category: {cat}. Brand: {brand}. Line: {word} {noun}. Edition: {edition}."
            )
            attrs.append({"category": cat, "brand": str(brand), "line": f"{word} {noun}", "step": step})
            members.append(row)
        lines.append(Line(cat, tuple(members)))
    # Zipf-like popularity over lines, decaying along each line (fewer people reach book 6).
    line_pop = 1.0 / np.arange(1, len(lines) + 1) ** 0.8
    rng.shuffle(line_pop)
    pop = np.zeros(n_items)
    for line, p in zip(lines, line_pop, strict=True):
        for k, row in enumerate(line.items):
            pop[row] = p * 0.85**k
    return Catalog(ids, titles, texts, attrs, source="<synthetic>"), lines, pop


def make_users(
    n_users: int, lines: list[Line], pop: np.ndarray, rng: np.random.Generator
) -> tuple[list[str], list[list[int]]]:
    """Users with 1-2 favourite categories who mostly continue the line they are in."""
    cats = list(CATEGORIES)
    by_cat: dict[str, list[int]] = {c: [] for c in cats}
    line_of: dict[int, tuple[Line, int]] = {}
    for line in lines:
        by_cat[line.category].append(line.items[0])
        for k, row in enumerate(line.items):
            line_of[row] = (line, k)
    users, seqs = [], []
    for u in range(n_users):
        favs = list(rng.choice(cats, size=int(rng.integers(1, 3)), replace=False))
        length = int(rng.integers(8, 31))
        seq: list[int] = []
        seen: set[int] = set()
        while len(seq) < length:
            nxt = None
            if seq:
                line, k = line_of[seq[-1]]
                r = rng.random()
                if r < 0.65 and k + 1 < len(line.items):
                    nxt = line.items[k + 1]
                elif r < 0.8:
                    comp = CATEGORIES[line.category][4]
                    nxt = _pick_start(by_cat[comp], pop, rng)
            if nxt is None:
                nxt = _pick_start(by_cat[str(rng.choice(favs))], pop, rng)
            if nxt in seen:
                nxt = _pick_start(by_cat[str(rng.choice(favs))], pop, rng)
            if nxt in seen:  # small catalogues: fall back to any unseen item, by popularity
                unseen = np.setdiff1d(np.arange(len(pop)), np.fromiter(seen, dtype=np.int64))
                if not len(unseen):
                    break
                nxt = int(unseen[rng.choice(len(unseen), p=pop[unseen] / pop[unseen].sum())])
            seen.add(nxt)
            seq.append(nxt)
        users.append(f"U{u:05d}")
        seqs.append(seq)
    return users, seqs


def _pick_start(starts: list[int], pop: np.ndarray, rng: np.random.Generator) -> int:
    w = pop[starts]
    return int(starts[int(rng.choice(len(starts), p=w / w.sum()))])


def generate(
    n_items: int = 2000, n_users: int = 2000, *, seed: int = 0
) -> tuple[Catalog, list[str], list[list[int]]]:
    """The embedded default dataset: (catalog, users, chronological item sequences)."""
    rng = np.random.default_rng(seed)
    catalog, lines, pop = make_catalog(n_items, rng)
    users, seqs = make_users(n_users, lines, pop, rng)
    return catalog, users, seqs
