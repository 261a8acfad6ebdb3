"""The long-document benchmark on small fixtures in the LicenseDB's own file format."""

from __future__ import annotations

import json
import math

import pytest
import torch

pytest.importorskip("yaml")

from longattn.longdoc import licensedb as ldb  # noqa: E402
from longattn.longdoc.embedding_cache import EmbeddingCache  # noqa: E402
from longattn.longdoc.locate import DocumentIndex, beyond_slice, token_offset  # noqa: E402
from longattn.longdoc.metrics import f1_scores, paired_bootstrap, retrieval_metrics, top_k  # noqa: E402
from longattn.longdoc.probe import fit_probe  # noqa: E402
from longattn.longdoc.sentences import split_sentences  # noqa: E402
from longattn.longdoc.tasks import (classification_task, retrieval_task, split_of,  # noqa: E402
                                    stable_unit)

CATEGORIES = ["Permissive", "Copyleft", "Permissive", "Copyleft Limited", "Permissive", "Commercial",
              "Copyleft", "Permissive", "Proprietary Free", "Permissive", "Copyleft Limited", "Permissive"]
WORDS = ("software license copy modify distribute warranty liability notice source binary patent grant "
         "contributor redistribution permission condition terms agreement").split()


def _license_text(i: int) -> str:
    gen = torch.Generator().manual_seed(i)
    body = " ".join(WORDS[int(j)] for j in torch.randint(len(WORDS), (40 + 30 * i,), generator=gen))
    return f"License number {i} grants {{{{rights}}}}.\n\n{body}.\n\nEnd of license {i}."


def write_db(root, *, extra_rules: dict | None = None):
    """A LicenseDB data folder with 12 licenses (one without text) and a dozen rules of every kind."""
    (root / "licenses").mkdir(parents=True)
    (root / "rules").mkdir()
    (root / "inactive").mkdir()
    for i, category in enumerate(CATEGORIES):
        text = "" if i == 11 else _license_text(i)
        (root / "licenses" / f"lic-{i}.LICENSE").write_text(
            f"---\nkey: lic-{i}\nshort_name: L{i}\nname: License {i}\ncategory: {category}\n"
            f"owner: Someone\nspdx_license_key: LicenseRef-{i}\n---" + (f"\n\n{text}\n" if text else ""))
    rules = {
        "lic-0_1": ("lic-0", "is_license_notice", "Licensed under license number 0 grants rights, see the file."),
        "lic-1_1": ("lic-1", "is_license_reference", "License {{1}}"),
        "lic-2_1": ("lic-2 OR lic-3", "is_license_tag", "lic-2 or lic-3"),
        "lic-4_1": ("(lic-4 AND lic-5) WITH lic-6", "is_license_text", _license_text(4)),
        "lic-7_1": ("lic-7", "is_license_notice", "Permission is granted under license 7."),
        "lic-11_1": ("lic-11", "is_license_reference", "License eleven"),  # no text in the corpus: dropped
        "fp_1": (None, "is_false_positive", "license copy"),
    }
    rules.update(extra_rules or {})
    for i in range(8, 11):
        rules[f"lic-{i}_{i}"] = (f"lic-{i}", "is_license_reference", f"See license number {i}.")
    for i in range(11):  # notices quoting each license's middle: every split gets queries
        words = _license_text(i).split()
        for j in range(3):
            rules[f"lic-{i}_n{j}"] = (f"lic-{i}", "is_license_notice", " ".join(words[10 + 7 * j:22 + 7 * j]))
    for name, (expression, kind, text) in rules.items():
        head = f"license_expression: {expression}\n" if expression else ""
        (root / "rules" / f"{name}.RULE").write_text(f"---\n{head}{kind}: yes\nrelevance: 100\n---\n\n{text}\n")
    (root / "inactive" / "old.RULE").write_text("not even front matter")
    return root


@pytest.fixture
def db(tmp_path):
    return ldb.load_licensedb(write_db(tmp_path / "data"))


# ---- parsing -------------------------------------------------------------------------------------------
def test_front_matter_and_texts(db):
    assert len(db.licenses) == 12 and len(db.rules) == 43  # inactive/ is not read
    lic = db.licenses["lic-3"]
    assert (lic.category, lic.name, lic.spdx) == ("Copyleft Limited", "License 3", "LicenseRef-3")
    assert lic.text.startswith("License number 3 grants rights.")  # {{ }} removed, edges stripped
    assert db.licenses["lic-11"].text == ""  # front matter closed at the end of the file
    assert db.rules["lic-1_1"].text == "License 1" and db.rules["lic-1_1"].kind == "reference"
    assert db.rules["fp_1"].kind == "false_positive" and db.rules["fp_1"].expression == ""


def test_expression_keys():
    assert ldb.expression_keys("gpl-2.0 OR mit") == ("gpl-2.0", "mit")
    assert ldb.expression_keys("(a AND b) WITH c-exception-1.0 or a") == ("a", "b", "c-exception-1.0")
    assert ldb.expression_keys("gpl-2.0-plus AND lgpl-2.1+") == ("gpl-2.0-plus", "lgpl-2.1+")
    for bad in ("", "(mit", "mit)", "AND", "mit OR $x"):
        with pytest.raises(ValueError):
            ldb.expression_keys(bad)


@pytest.mark.parametrize("content, message", [
    ("no front matter\n", "no front matter"),
    ("---\nlicense_expression: lic-0\nis_license_notice: yes\n", "not closed"),
    ("---\nlicense_expression: [lic-0\nis_license_notice: yes\n---\ntext", "bad YAML"),
    ("---\nlicense_expression: lic-0 OR nope\nis_license_notice: yes\n---\ntext", r"unknown license key\(s\) nope"),
    ("---\nlicense_expression: lic-0\n---\ntext", "exactly one of"),
    ("---\n- a list\n---\ntext", "must be a mapping"),
])
def test_malformed_rule_names_the_file(tmp_path, content, message):
    root = write_db(tmp_path / "data")
    (root / "rules" / "broken_1.RULE").write_text(content)
    with pytest.raises(ldb.LicenseDBError, match=message) as err:
        ldb.load_licensedb(root)
    assert "broken_1.RULE" in str(err.value)


def test_malformed_license_names_the_file(tmp_path):
    root = write_db(tmp_path / "data")
    (root / "licenses" / "odd.LICENSE").write_text("---\nkey: other\ncategory: Permissive\n---\ntext")
    with pytest.raises(ldb.LicenseDBError, match="odd.LICENSE: key 'other' differs"):
        ldb.load_licensedb(root)
    with pytest.raises(ldb.LicenseDBError, match="no licenses/ folder"):
        ldb.load_licensedb(tmp_path)


# ---- splits ------------------------------------------------------------------------------------------
def test_splits_are_stable(db):
    # pinned values: a change of the hash or the thresholds would silently move rules between splits
    assert [split_of(n) for n in ("mit_1", "gpl-2.0_12", "apache-2.0_47", "bsd-new_3")] == \
        [split_of(n) for n in ("mit_1", "gpl-2.0_12", "apache-2.0_47", "bsd-new_3")]
    assert stable_unit("mit_1", "split:") == pytest.approx(int.from_bytes(
        __import__("hashlib").sha256(b"split:mit_1").digest()[:8], "big") / 2 ** 64)
    task = retrieval_task(db)
    names = {q.name for qs in task.queries.values() for q in qs}
    assert "fp_1" not in names and "lic-11_1" not in names  # false positive; no text in the corpus
    assert [lic.key for lic in task.corpus] == sorted(f"lic-{i}" for i in range(11))
    for split, qs in task.queries.items():
        assert all(split_of(q.name) == split for q in qs)
    query = next(q for qs in task.queries.values() for q in qs if q.name == "lic-4_1")
    assert query.relevant == ("lic-4", "lic-5", "lic-6") and query.kind == "text"
    assert retrieval_task(db).queries == task.queries  # deterministic


def test_classification_split_is_stratified(db):
    task = classification_task(db)
    sizes = {s: len(d) for s, d in task.documents.items()}
    assert sum(sizes.values()) == 11
    for category in ("Permissive", "Copyleft"):  # two or more licenses: one in test
        assert any(lic.category == category for lic in task.documents["test"])
    assert task.labels[0] == "Permissive"
    assert classification_task(db).documents == task.documents


def test_installed_licensedb_counts_and_splits():
    pytest.importorskip("licensedcode")
    db = ldb.load_licensedb()
    assert len(db.licenses) == 2310 and len(db.rules) == 34859
    task = retrieval_task(db)
    assert {s: len(q) for s, q in task.queries.items()} == {"train": 25650, "val": 3267, "test": 3154}
    assert len(task.corpus) == 2289


# ---- metrics -----------------------------------------------------------------------------------------
def test_retrieval_metrics_by_hand():
    ranking = torch.tensor([[3, 1, 4, 0, 5, 9, 2, 6, 8, 7],
                            [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
                            [9, 8, 7, 6, 5, 4, 3, 2, 1, 0]])
    m = retrieval_metrics(ranking, [[1, 7], [0], [11]])
    assert m["R@1"].tolist() == [0.0, 1.0, 0.0]
    assert m["R@5"].tolist() == [0.5, 1.0, 0.0]
    assert m["R@10"].tolist() == [1.0, 1.0, 0.0]
    assert m["MRR@10"].tolist() == [0.5, 1.0, 0.0]
    with pytest.raises(ValueError, match="at least 10"):
        retrieval_metrics(ranking[:, :5], [[1], [0], [1]])


def test_top_k_breaks_ties_by_index():
    scores = torch.tensor([[0.5, 1.0, 0.5, 1.0, 0.0]])
    assert top_k(scores, 4).tolist() == [[1, 3, 0, 2]]


def test_f1_by_hand():
    out = f1_scores([0, 0, 1, 2], [0, 1, 1, 1])
    assert out["micro_f1"] == 0.5
    # class 0: tp 1 fp 1 fn 0 -> 2/3; class 1: tp 1 fp 0 fn 2 -> 2/4; class 2: tp 0 fp 1 -> 0
    assert out["macro_f1"] == pytest.approx((2 / 3 + 0.5 + 0) / 3)


def test_paired_bootstrap():
    a, b = torch.tensor([1.0, 0.0, 1.0, 1.0]), torch.tensor([0.0, 0.0, 1.0, 0.0])
    out = paired_bootstrap(a, b, samples=500)
    assert out["diff"] == 0.5 and 0.0 <= out["low"] <= 0.5 <= out["high"] <= 1.0 and out["n"] == 4
    same = paired_bootstrap(a, a)
    assert same["low"] == same["high"] == 0.0
    assert math.isnan(paired_bootstrap(torch.zeros(0), torch.zeros(0))["diff"])


def test_probe_separates_separable_classes():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(60, 5, generator=gen) + torch.arange(3).repeat(20)[:, None] * 4.0
    y = torch.arange(3).repeat(20)
    probe = fit_probe(x, y, 3, l2=1e-3, balanced=True)
    assert f1_scores(probe.predict(x), y)["micro_f1"] == 1.0


# ---- locate, sentences ---------------------------------------------------------------------------------
def test_locate_finds_text_and_its_token_offset():
    doc = "Preamble words here. " * 50 + "You may redistribute it and or modify it under the terms here."
    index = DocumentIndex.of(doc)
    char = index.locate("you may redistribute it and/or modify it under the terms")
    assert char == doc.index("You may")
    assert index.locate("nothing like this text appears anywhere at all") is None
    assert index.locate("MIT") is None  # under five words: never located
    starts = [0, 5, 9, 30]
    assert [token_offset(starts, c) for c in (0, 4, 5, 29, 31)] == [0, 0, 1, 2, 3]

    class Q:
        name, text, relevant = "q", "you may redistribute it and or modify it", ("a",)

    words_starts = lambda text: [m.start() for m in __import__("re").finditer(r"\S+", text)]  # noqa: E731
    assert beyond_slice([Q], {"a": doc}, words_starts, kept_tokens=100)["q"] == 150
    assert beyond_slice([Q], {"a": doc}, words_starts, kept_tokens=200)["q"] is None


def test_split_sentences():
    text = "First clause; Second one. third stays.\n\n1. Numbered item: Another\n" + "word " * 130
    parts = split_sentences(text, max_words=64)
    assert parts[:4] == ["First clause;", "Second one. third stays.", "1.", "Numbered item:"]
    tail = parts[4:]
    assert [len(p.split()) for p in tail] == [44, 44, 43]  # 131 words in three equal pieces
    assert split_sentences("   ") == []


# ---- the embedding cache -------------------------------------------------------------------------------
def test_embedding_cache_computes_each_text_once_and_resumes(tmp_path):
    calls = []

    def compute(texts):
        calls.append(list(texts))
        return [torch.full((len(t), 2), float(len(t))) for t in texts]

    cache = EmbeddingCache(tmp_path, "f" * 64, "trunc")
    out = cache.get(["aa", "b", "aa"], compute)
    assert [o.shape for o in out] == [(2, 2), (1, 2), (2, 2)] and calls == [["aa", "b"]]
    again = EmbeddingCache(tmp_path, "f" * 64, "trunc")  # a new process: read from disk
    assert torch.equal(again.get(["b", "ccc"], compute)[0], out[1]) and calls[-1] == ["ccc"]
    assert again.cost(["aa", "b"]) >= 0.0
    with pytest.raises(ValueError, match="holds the view"):  # same file name, another encoder
        EmbeddingCache(tmp_path, "f" * 16 + "0" * 48, "trunc")


# ---- the command -------------------------------------------------------------------------------------
def test_stats_json(tmp_path, capsys):
    from longattn.cli import main

    root = write_db(tmp_path / "data")
    assert main(["longdoc", "stats", "--data-dir", str(root), "--json", "--words-only"]) == 0
    stats = json.loads(capsys.readouterr().out)
    assert stats["licenses"] == 12 and stats["rules"] == 43
    assert stats["categories"] == {"Permissive": 6, "Copyleft": 2, "Copyleft Limited": 2, "Commercial": 1,
                                   "Proprietary Free": 1}
    assert stats["rule_kinds"]["reference"] == 5 and stats["licenses_without_text"] == 1


def test_bad_data_dir_is_a_clear_error(tmp_path, capsys):
    from longattn.cli import main

    assert main(["longdoc", "stats", "--data-dir", str(tmp_path), "--words-only"]) == 2
    assert "no licenses/ folder" in capsys.readouterr().err
