"""``longattn longdoc stats``: what the LicenseDB holds, and the splits the tasks use."""

from __future__ import annotations

from collections import Counter

from .licensedb import LicenseDB
from .tasks import classification_task, retrieval_task

PERCENTILES = (10, 25, 50, 75, 90, 99, 100)


def percentiles(values: list[int]) -> dict[str, int]:
    """Nearest-rank percentiles ``{"p10": ..., "p100": max}`` of ``values`` (empty: {})."""
    ordered = sorted(values)
    if not ordered:
        return {}
    return {f"p{p}": ordered[max(0, -(-p * len(ordered) // 100) - 1)] for p in PERCENTILES}


def database_stats(db: LicenseDB, *, quick: bool = False, count_tokens=None) -> dict:
    """The JSON of ``longdoc stats``: ``licenses`` (every .LICENSE file), ``rules`` (every .RULE file,
    false positives included), ``categories`` (category -> licenses), rule kinds, length percentiles (words;
    tokens too when ``count_tokens(texts)`` is given) and the split sizes of both tasks."""
    texts = [lic.text for lic in db.licenses.values()]
    words = [len(t.split()) for t in texts]
    out = {
        "source": str(db.source),
        "licenses": len(db.licenses),
        "rules": len(db.rules),
        "categories": dict(Counter(lic.category for lic in db.licenses.values()).most_common()),
        "rule_kinds": dict(Counter(r.kind for r in db.rules.values()).most_common()),
        "licenses_without_text": sum(not t for t in texts),
        "license_words": percentiles(words),
        "rule_words": percentiles([len(r.text.split()) for r in db.rules.values()]),
    }
    if count_tokens is not None:
        tokens = count_tokens([t for t in texts if t])
        out["license_tokens"] = percentiles(tokens)
        out["licenses_over_512_tokens"] = sum(n > 512 for n in tokens)
    retrieval, classification = retrieval_task(db, quick=quick), classification_task(db, quick=quick)
    out["retrieval"] = {"corpus": len(retrieval.corpus), **{s: len(q) for s, q in retrieval.queries.items()}}
    out["classification"] = {s: len(d) for s, d in classification.documents.items()}
    return out
