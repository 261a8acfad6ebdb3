"""LRA ListOps: operator semantics, the generator against its settings, the official TSV format and loader."""

from __future__ import annotations

import json
import statistics

import pytest
import torch

from longattn.datasets import listops as lo
from longattn.datasets.listops import ListOpsSettings, evaluate, generate_examples
from longattn.lra.tasks import DataFormatError, MissingDataError, get_task
from longattn.lra.tasks.listops import VOCAB, ListOps, decode, encode

SMALL = dict(max_depth=5, max_args=4, min_length=12, max_length=60, num_train=40, num_val=6, num_test=5)
HEADER = "Source\tTarget\r\n"


def compact(source: str) -> list[str]:
    return [t for t in source.split() if t not in "()"]


def official(tokens: list[str]) -> str:
    """The test's own writer of LRA's format: an operator with k arguments is ``(`` x (k+1), op, each
    argument followed by ``)``, then ``] )`` (LRA's ``to_string`` of the binary parse tree)."""
    def node(i):
        if tokens[i] not in lo.OPERATORS:
            return tokens[i], i + 1
        args, j = [], i + 1
        while tokens[j] != "]":
            text, j = node(j)
            args.append(text + " )")
        return " ".join(["("] * (len(args) + 1) + [tokens[i]] + args + ["] )"]), j + 1
    return node(0)[0]


def arities(tokens: list[str]) -> list[int]:
    """Number of arguments of every operator."""
    stack, out = [], []
    for tok in tokens:
        if tok == "]":
            out.append(stack.pop())
            continue
        if stack:
            stack[-1] += 1  # a digit or an operator is one argument of the innermost open operator
        if tok in lo.OPERATORS:
            stack.append(0)
    return out


# --------------------------------------------------------------------------------------------- semantics
@pytest.mark.parametrize("text, value", [
    ("[MIN 4 7 2 ]", 2), ("[MAX 2 9 [MIN 4 7 ] 0 ]", 9), ("[SM 5 7 9 ]", 1), ("[SM 0 0 ]", 0),
    ("[MED 9 0 5 ]", 5), ("[MED 3 4 ]", 3), ("[MED 1 2 3 4 ]", 2), ("[MED 8 9 ]", 8), ("[MED 2 2 9 9 ]", 5),
    ("[MAX [SM 9 9 ] [MED 1 2 ] ]", 8), ("7", 7),
    ("( ( ( [MED 6 ) 8 ) ] )", 7),  # a line of LRA's basic_train.tsv (long-range-arena issue #6)
    ("( ( ( ( [SM ( ( ( [MED 6 ) 8 ) ] ) ) 0 ) 2 ) ] )", 9),
])
def test_evaluate_hand_examples(text, value):
    assert evaluate(text) == value
    assert evaluate(text.split()) == value


def test_median_matches_the_original_int_of_median():
    gen = torch.Generator().manual_seed(0)
    for n in range(1, 11):
        for _ in range(20):
            args = torch.randint(0, 10, (n,), generator=gen).tolist()
            text = "[MED " + " ".join(map(str, args)) + " ]"
            assert evaluate(text) == int(statistics.median(args))


@pytest.mark.parametrize("text, problem", [
    ("[MAX 2 10 ]", "unknown"), ("[MAX 2 9", "not closed"), ("[MAX 2 9 ] ]", "closes no"),
    ("[MIN ]", "no arguments"), ("3 4", "one expression"), ("", "one expression"),
])
def test_evaluate_rejects_malformed(text, problem):
    with pytest.raises(ValueError, match=problem):
        evaluate(text)


def test_vocabulary_and_tree_depth():
    assert ListOps.vocab_size == len(VOCAB) == 16 and VOCAB[0] == "<pad>"
    assert encode("( ( ( [MAX 2 ) 9 ) ] )") == [12, 3, 10, 15]
    assert decode(torch.tensor([12, 3, 10, 15, 0, 0])) == ["[MAX", "2", "9", "]"]
    assert [lo.tree_depth(t) for t in ("5", "[MAX 2 9 ]", "[MAX 2 [MIN 4 [SM 1 1 ] ] ]")] == [1, 2, 4]


# --------------------------------------------------------------------------------------------- generator
def test_generator_respects_settings_and_labels():
    s = ListOpsSettings(**SMALL, min_value=2, max_value=6)
    examples = list(generate_examples(s, seed=3))
    assert len(examples) == 51 and len({src for src, _ in examples}) == 51  # distinct, as LRA's set
    for source, label in examples:
        tokens = compact(source)
        assert evaluate(source) == label and 0 <= label <= 9
        assert s.min_length < len(tokens) < s.max_length
        assert lo.tree_depth(tokens) <= s.max_depth
        assert all(2 <= k <= s.max_args for k in arities(tokens))
        assert {t for t in tokens if t.isdigit()} <= set("23456")
        assert source == official(tokens)  # LRA's parenthesised layout, token for token


def test_generator_is_deterministic_per_seed():
    s = ListOpsSettings(**SMALL)
    first = list(generate_examples(s, seed=7))
    assert first == list(generate_examples(s, seed=7))
    assert first != list(generate_examples(s, seed=8))


def test_generator_reaches_depth_and_arity_limits():
    s = ListOpsSettings(max_depth=4, max_args=3, min_length=8, max_length=40, num_train=200, num_val=0, num_test=0)
    tokens = [compact(src) for src, _ in generate_examples(s)]
    assert max(lo.tree_depth(t) for t in tokens) == 4
    assert {k for t in tokens for k in arities(t)} == {2, 3}


def test_unreachable_lengths_raise_at_once():
    # Depth 3 with 2 arguments: at most 10 tokens.
    with pytest.raises(ValueError, match="cannot reach the length range"):
        generate_examples(ListOpsSettings(max_depth=3, max_args=2, min_length=20, max_length=100))
    # Two arguments make lengths 1, 4, 7, 10, ...: 5 alone is unreachable.
    with pytest.raises(ValueError, match="cannot reach"):
        generate_examples(ListOpsSettings(max_args=2, min_length=4, max_length=6))


def test_too_few_distinct_trees_raise(monkeypatch):
    monkeypatch.setattr(lo, "_FRUITLESS", 2000)
    # One digit value and length 4 only: [MIN 0 0 ], [MAX 0 0 ], [MED 0 0 ], [SM 0 0 ].
    s = ListOpsSettings(max_depth=2, max_args=2, min_length=3, max_length=5, num_train=5, num_val=0,
                        num_test=0, max_value=0)
    with pytest.raises(ValueError, match="no new example"):
        list(generate_examples(s))


@pytest.mark.parametrize("kwargs, error", [
    (dict(max_args=1), ValueError), (dict(max_depth=0), ValueError), (dict(min_length=10, max_length=11), ValueError),
    (dict(max_value=10), ValueError), (dict(min_value=5, max_value=4), ValueError), (dict(num_val=-1), ValueError),
    (dict(operator_prob=0.0), ValueError), (dict(max_depth=2.5), TypeError),
])
def test_settings_validation(kwargs, error):
    with pytest.raises(error, match=next(iter(kwargs)).split("_")[0]):
        ListOpsSettings(**kwargs)


# --------------------------------------------------------------------------------------------- files
def test_generate_then_load_round_trip(tmp_path):
    task = get_task("listops", tmp_path)
    assert isinstance(task, ListOps) and (task.num_classes, task.pooling, task.can_generate) == (10, "cls", True)
    assert not task.available()
    task.generate(seed=1, **SMALL)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basic_test.tsv", "basic_train.tsv", "basic_val.tsv"]
    assert task.available()
    for split, n in (("train", 40), ("val", 6), ("test", 5)):
        raw = (tmp_path / f"basic_{split}.tsv").read_bytes().decode()
        assert raw.startswith(HEADER) and raw.count("\r\n") == n + 1
        rows = [line.split("\t") for line in raw.splitlines()[1:]]
        data = task.load(split)
        assert len(data) == n and data.tokens.shape == (n, 2000) and task.truncated[split] == 0
        assert int(data.tokens.max()) < task.vocab_size
        for i, (source, label) in enumerate(rows):
            length = int(data.lengths[i])
            assert decode(data.tokens[i]) == compact(source) and length == len(compact(source))
            assert (data.tokens[i, :length] != 0).all() and (data.tokens[i, length:] == 0).all()
            assert int(data.labels[i]) == int(label) == evaluate(decode(data.tokens[i]))


def test_generate_failure_leaves_folder_untouched(tmp_path, monkeypatch):
    ListOps(tmp_path).generate(seed=0, **SMALL)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    monkeypatch.setattr(lo, "_FRUITLESS", 2000)
    with pytest.raises(ValueError):
        ListOps(tmp_path).generate(max_depth=2, max_args=2, min_length=3, max_length=5, max_value=0, num_train=2,
                                   num_val=2, num_test=2)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before


def test_load_hand_written_official_file(tmp_path):
    folder = tmp_path / "listops-1000"  # the release's folder name is found too
    folder.mkdir()
    lines = ["( ( ( [MAX 2 ) 9 ) ] )\t9", "( ( ( ( [SM ( ( ( [MED 6 ) 8 ) ] ) ) 0 ) 2 ) ] )\t9",
             "[MIN 4 [MAX 1 2 ] ]\t2", "  7 \t 7"]
    for split in ("train", "val", "test"):
        (folder / f"basic_{split}.tsv").write_bytes((HEADER + "\r\n".join(lines) + "\r\n").encode())
    data = ListOps(tmp_path).load("train")
    assert data.labels.tolist() == [9, 9, 2, 7]
    assert data.lengths.tolist() == [4, 8, 7, 1]
    assert data.tokens[0, :5].tolist() == [12, 3, 10, 15, 0]
    assert decode(data.tokens[1]) == ["[SM", "[MED", "6", "8", "]", "0", "2", "]"]
    assert data.tokens.dtype == torch.int16 and data.labels.dtype == torch.int64

    short = ListOps(tmp_path, max_length=5)
    with pytest.warns(UserWarning, match="2 of 4 examples are longer than max_length=5"):
        cut = short.load("val")
    assert short.truncated["val"] == 2 and cut.tokens.shape == (4, 5) and cut.lengths.tolist() == [4, 5, 5, 1]


@pytest.mark.parametrize("line, line_no, problem", [
    ("[MAX 2 9 ]\t9\textra", 3, "columns"),
    ("[MAX 2 9 ]", 3, "columns"),
    ("[MAX 2 10 ]\t9", 3, "unknown token '10'"),
    ("[MAX 2 MIN ]\t9", 3, "unknown token 'MIN'"),
    ("[MAX 2 9 ]\t12", 3, "not in 0..9"),
    ("[MAX 2 9 ]\tnine", 3, "not an integer"),
    ("( )\t1", 3, "no tokens"),
])
def test_malformed_lines_name_file_and_line(tmp_path, line, line_no, problem):
    path = tmp_path / "basic_train.tsv"
    path.write_text(HEADER + "[MIN 1 2 ]\t1\r\n" + line + "\r\n")
    with pytest.raises(DataFormatError, match=problem) as info:
        ListOps(tmp_path).load("train")
    assert info.value.line == line_no and info.value.path == path
    assert f"basic_train.tsv:{line_no}" in str(info.value)


def test_missing_header_is_a_format_error(tmp_path):
    (tmp_path / "basic_val.tsv").write_text("[MIN 1 2 ]\t1\n")
    with pytest.raises(DataFormatError, match="header") as info:
        ListOps(tmp_path).load("val")
    assert info.value.line == 1 and "basic_val.tsv:1" in str(info.value)


def test_missing_files_say_what_and_how(tmp_path):
    task = ListOps(tmp_path)
    with pytest.raises(MissingDataError) as info:
        task.load("test")
    message = str(info.value)
    for needed in ("basic_train.tsv", "basic_val.tsv", "basic_test.tsv", str(tmp_path),
                   f"longattn lra generate --task listops --data-dir {tmp_path}"):
        assert needed in message


def test_statistics(tmp_path):
    task = ListOps(tmp_path, max_length=100)
    task.generate(seed=2, **SMALL)
    stats = task.statistics()
    json.dumps(stats)
    for split, n in (("train", 40), ("val", 6), ("test", 5)):
        st = stats[split]
        assert st["examples"] == n and st["truncated"] == 0
        assert st["length_histogram"]["bin_width"] == 100 and sum(st["length_histogram"]["counts"]) == n
        assert sum(st["depth_histogram"]) == n and len(st["depth_histogram"]) <= SMALL["max_depth"] + 1
        assert max(st["label_share"]) == st["majority_rate"] == st["label_share"][st["majority_class"]]
        assert 0.1 <= st["majority_rate"] <= 1.0
        assert set(st["operator_counts"]) == {"MIN", "MAX", "MED", "SM"}
    data = task.load("train")
    depths = [lo.tree_depth(decode(row)) for row in data.tokens]
    assert stats["train"]["depth_histogram"] == [depths.count(d) for d in range(max(depths) + 1)]
    ops = sum(stats["train"]["operator_counts"].values())
    assert ops == int(((data.tokens >= 11) & (data.tokens <= 14)).sum()) == int((data.tokens == 15).sum())
