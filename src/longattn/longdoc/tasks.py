"""The two LicenseDB tasks on fixed, deterministic splits.

**Retrieval** (a query against a fixed corpus of long articles, as COLIEE's statute retrieval): the query is
a rule's text, the relevant documents are the licenses its expression names, the corpus is every license
with a text. Rules are split 80/10/10 into train/val/test by a stable hash of the rule's name, so a rule
keeps its split when the database grows. Left out: false positives (no license), rules with an empty text,
and the keys an expression names that have no text in the corpus (a rule with none left is dropped).

**Classification**: a license text -> its category. Licenses with a text are split 70/10/20 by a stable hash
of the key inside each category (stratified); every category with two or more licenses has one in test.

``quick=True`` keeps a deterministic sample of the corpus (the licenses first in hash order, so the sample
keeps the corpus' mix of lengths and categories) for both tasks, and the queries whose relevant licenses are
all in it: every document is encoded once and serves both tasks.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .licensedb import License, LicenseDB

SPLITS = ("train", "val", "test")
RETRIEVAL_FRACTIONS = (0.8, 0.1, 0.1)
CLASSIFICATION_FRACTIONS = (0.7, 0.1, 0.2)
QUICK_CORPUS = 160  # licenses in the --quick corpus
QUICK_QUERIES = 240  # test queries at most in --quick (and as many train queries x 4)


def stable_unit(name: str, salt: str = "") -> float:
    """A number in [0, 1) from ``name`` alone (sha256), the same on every machine and Python version."""
    digest = hashlib.sha256(f"{salt}{name}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2 ** 64


def split_of(name: str, fractions: tuple[float, float, float] = RETRIEVAL_FRACTIONS) -> str:
    u = stable_unit(name, "split:")
    return "train" if u < fractions[0] else "val" if u < fractions[0] + fractions[1] else "test"


@dataclass(frozen=True)
class Query:
    name: str  # the rule's name
    text: str
    kind: str  # notice, reference, text, tag, intro, clue
    relevant: tuple[str, ...]  # license keys (all in the corpus)


@dataclass
class RetrievalTask:
    corpus: list[License]  # sorted by key; documents are addressed by their index here
    queries: dict[str, list[Query]]  # split -> queries, sorted by name
    quick: bool = False

    def index(self) -> dict[str, int]:
        return {lic.key: i for i, lic in enumerate(self.corpus)}


@dataclass
class ClassificationTask:
    documents: dict[str, list[License]]  # split -> licenses, sorted by key
    labels: list[str]  # the categories, sorted by size (largest first), then name

    def targets(self, split: str) -> list[int]:
        index = {c: i for i, c in enumerate(self.labels)}
        return [index[lic.category] for lic in self.documents[split]]


def _corpus(db: LicenseDB, quick: bool) -> list[License]:
    corpus = [lic for lic in db.licenses.values() if lic.text]
    if quick:
        corpus = sorted(corpus, key=lambda lic: stable_unit(lic.key, "quick:"))[:QUICK_CORPUS]
    return sorted(corpus, key=lambda lic: lic.key)


def retrieval_task(db: LicenseDB, *, quick: bool = False) -> RetrievalTask:
    corpus = _corpus(db, quick)
    keys = {lic.key for lic in corpus}
    queries: dict[str, list[Query]] = {s: [] for s in SPLITS}
    for rule in db.rules.values():
        if rule.kind == "false_positive" or not rule.text:
            continue
        relevant = tuple(k for k in rule.keys if k in keys)
        if quick and len(relevant) < len(rule.keys):
            continue
        if relevant:
            queries[split_of(rule.name)].append(Query(rule.name, rule.text, rule.kind, relevant))
    if quick:  # a fixed sample, the same on every machine
        for split, limit in (("train", 4 * QUICK_QUERIES), ("val", QUICK_QUERIES), ("test", QUICK_QUERIES)):
            queries[split] = sorted(queries[split], key=lambda q: stable_unit(q.name, "quick:"))[:limit]
    return RetrievalTask(corpus, {s: sorted(qs, key=lambda q: q.name) for s, qs in queries.items()}, quick)


def classification_task(db: LicenseDB, *, quick: bool = False) -> ClassificationTask:
    docs = _corpus(db, quick)
    by_category: dict[str, list[License]] = {}
    for lic in docs:
        by_category.setdefault(lic.category, []).append(lic)
    split: dict[str, list[License]] = {s: [] for s in SPLITS}
    for members in by_category.values():
        members = sorted(members, key=lambda lic: stable_unit(lic.key, "classify:"))
        n = len(members)
        test = max(1, round(CLASSIFICATION_FRACTIONS[2] * n)) if n >= 2 else 0
        val = round(CLASSIFICATION_FRACTIONS[1] * n) if n - test >= 3 else 0
        split["test"] += members[:test]
        split["val"] += members[test:test + val]
        split["train"] += members[test + val:]
    labels = sorted(by_category, key=lambda c: (-len(by_category[c]), c))
    return ClassificationTask({s: sorted(m, key=lambda lic: lic.key) for s, m in split.items()}, labels)
