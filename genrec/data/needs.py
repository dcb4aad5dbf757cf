"""Needs: the short free text a user might type when asking for an item, derived from the item itself.

A need names what kind of item is wanted (its category or genres), sometimes its brand, and a few words
of its title — fewer than half of them, so a need describes the item without naming it. Needs are what the
multi-task training rows (`train.need_rows`) pair with a history, and what the need evaluation
(`genrec evaluate --protocol need`) gives with each test user's history. Deterministic for a seed, an
item and a user. Knows catalogues only: nothing of prompts, models or metrics.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np

from genrec.data.catalog import Catalog

CATEGORY_KEYS = ("category", "categories")
"""Attribute keys that name an item's kind (the synthetic generator's, UniSRec's parsed text)."""
GENRE_KEY = "genres"
"""MovieLens: genres joined by '|'."""
BRAND_KEY = "brand"
_WORD = re.compile(r"[A-Za-z][A-Za-z'&-]{2,}")
_CATEGORY_WORDS = 4
"""Most words of a category path kept (its leaf end: 'Sealants Urethane Adhesives')."""


def _rng(seed: int, item: int, user: str) -> np.random.Generator:
    digest = hashlib.sha256(f"{seed}:{item}:{user}".encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _kind(attributes: dict[str, str]) -> str:
    """What kind of item it is, in words: its category's leaf words, or its genres."""
    for key in CATEGORY_KEYS:
        value = attributes.get(key, "").strip()
        if value:
            return " ".join(value.split()[-_CATEGORY_WORDS:]).lower()
    genres = [g.strip().lower() for g in attributes.get(GENRE_KEY, "").split("|") if g.strip()]
    genres = [g for g in genres if g != "unknown"]
    if genres:
        return " or ".join(genres[:2])
    return ""


def title_hint(title: str, *, words: int, rng: np.random.Generator, avoid: str = "") -> str:
    """Up to `words` words of `title` (in title order, skipping short words and those in `avoid`), always
    fewer than half of the title's words (of three letters or more; a year, a number or "a" does not count):
    a hint, never a name. "Toy Story (1995)" gives none, where its two words would name the movie."""
    found = _WORD.findall(title)
    avoid_words = {w.lower() for w in _WORD.findall(avoid)}
    pool = [w for w in dict.fromkeys(found) if w.lower() not in avoid_words]
    k = min(words, len(pool), (len(found) - 1) // 2)
    if k <= 0:
        return ""
    picked = sorted(rng.choice(len(pool), size=k, replace=False).tolist())
    return " ".join(pool[i] for i in picked)


def derive_need(catalog: Catalog, item: int, *, user: str = "", seed: int = 0, title_words: int = 2) -> str:
    """A short request for `item` in words ('looking for skincare by Lumiere, something like: Hydra'),
    built from its category or genres, its brand (half of the time) and `title_words` words of its title.
    Never names the item: fewer than half of its title's words, never the whole title."""
    rng = _rng(seed, item, user)
    attrs = catalog.attributes[item]
    title = catalog.titles[item] or ""
    kind = _kind(attrs)
    brand = attrs.get(BRAND_KEY, "").strip()
    parts = [f"looking for {kind or 'something new'}"]
    if brand and rng.random() < 0.5:
        parts.append(f"by {brand}")
    hint = title_hint(title, words=title_words, rng=rng, avoid=f"{brand} {kind}")
    need = " ".join(parts) + (f", something like: {hint}" if hint else "")
    if title.strip() and title.strip().lower() in need.lower():  # a title that is just its brand or kind
        need = f"looking for {kind or 'something new'}"
        if title.strip().lower() in need.lower():
            need = "looking for something new"
    return need


def needs_for(
    catalog: Catalog, items: list[int], users: list[str], *, seed: int = 0, title_words: int = 2
) -> list[str]:
    """`derive_need` for each (item, user) pair."""
    return [
        derive_need(catalog, i, user=u, seed=seed, title_words=title_words)
        for i, u in zip(items, users, strict=True)
    ]
