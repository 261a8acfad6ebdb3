"""The ScanCode LicenseDB as a long-document corpus: license texts and the rules found in real software.

The ``licensedcode-data`` package (ScanCode LicenseDB, CC-BY-4.0, by nexB Inc. and others) ships
``licensedcode/data/licenses/*.LICENSE`` (one license text per file) and ``licensedcode/data/rules/*.RULE``
(fragments of real notices, references, tags and variant texts, each with the license expression it
detects). Every file is a YAML front matter between two ``---`` lines followed by the text. ScanCode marks
the phrases a rule must contain with ``{{...}}``; the braces are markup, not text, and are removed here.

``load_licensedb()`` finds the files through the installed package; ``load_licensedb(data_dir)`` reads another
copy laid out the same way (``data_dir/licenses``, ``data_dir/rules``, as in a ScanCode checkout's
``src/licensedcode/data``). A file that cannot be read (no front matter, bad YAML, no ``key``/``category``,
a rule whose expression names a license the database does not have) raises ``LicenseDBError`` naming it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

#: the rule kinds of the front matter, in the order a rule's kind is read (a rule carries one of them)
RULE_KINDS = {
    "is_license_text": "text", "is_license_notice": "notice", "is_license_reference": "reference",
    "is_license_tag": "tag", "is_license_intro": "intro", "is_license_clue": "clue",
    "is_false_positive": "false_positive",
}
_OPERATORS = {"and", "or", "with"}
_EXPRESSION_TOKEN = re.compile(r"\(|\)|[^\s()]+")
_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
_REQUIRED_PHRASE = re.compile(r"\{\{|\}\}")


class LicenseDBError(ValueError):
    """A LicenseDB file that cannot be read; the message names the file."""


@dataclass(frozen=True)
class License:
    key: str  # the file's stem, e.g. "gpl-2.0"
    name: str
    category: str  # "Permissive", "Copyleft", ... (11 in LicenseDB 32.1)
    spdx: str | None  # spdx_license_key
    text: str
    deprecated: bool = False


@dataclass(frozen=True)
class Rule:
    name: str  # the file's stem, e.g. "gpl-2.0_12"
    expression: str  # license_expression, e.g. "gpl-2.0 OR mit"
    kind: str  # a value of RULE_KINDS
    text: str

    @property
    def keys(self) -> tuple[str, ...]:
        """The license keys the expression names, in order of first appearance."""
        return expression_keys(self.expression)


@dataclass
class LicenseDB:
    licenses: dict[str, License]  # key -> license, sorted by key
    rules: dict[str, Rule]  # name -> rule (false positives included), sorted by name
    source: Path  # the data directory read


# ---- parsing ----------------------------------------------------------------------------------------
def split_front_matter(text: str, path: Path | str) -> tuple[dict, str]:
    """``(front matter as a dict, body)`` of one LicenseDB file. The closing ``---`` may end the file."""
    import yaml  # the longdoc extra

    lines = text.split("\n")
    if not lines or lines[0].strip() != "---":
        raise LicenseDBError(f"{path}: no front matter (the file must start with a '---' line)")
    end = next((i for i in range(1, len(lines)) if lines[i].strip() == "---"), None)
    if end is None:
        raise LicenseDBError(f"{path}: front matter not closed (no second '---' line)")
    try:
        meta = yaml.load("\n".join(lines[1:end]), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except yaml.YAMLError as e:
        raise LicenseDBError(f"{path}: bad YAML front matter: {e}") from None
    if not isinstance(meta, dict):
        raise LicenseDBError(f"{path}: the front matter must be a mapping, got {type(meta).__name__}")
    return meta, clean_text("\n".join(lines[end + 1:]))


def clean_text(text: str) -> str:
    """The text as a reader sees it: ScanCode's ``{{required phrase}}`` braces removed, edges stripped."""
    return _REQUIRED_PHRASE.sub("", text).strip()


def expression_keys(expression: str) -> tuple[str, ...]:
    """License keys of a ScanCode expression (``AND``/``OR``/``WITH`` and parentheses), first appearance order.

    Raises ``ValueError`` for a token that is no key, unbalanced parentheses or an empty expression."""
    keys, depth = [], 0
    for token in _EXPRESSION_TOKEN.findall(expression):
        if token in "()":
            depth += 1 if token == "(" else -1
            if depth < 0:
                raise ValueError(f"unbalanced ')' in license_expression {expression!r}")
        elif token.lower() not in _OPERATORS:
            if not _KEY.match(token):
                raise ValueError(f"bad license key {token!r} in license_expression {expression!r}")
            if token not in keys:
                keys.append(token)
    if depth:
        raise ValueError(f"unbalanced '(' in license_expression {expression!r}")
    if not keys:
        raise ValueError(f"license_expression {expression!r} names no license")
    return tuple(keys)


def _read(path: Path) -> tuple[dict, str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LicenseDBError(f"{path}: not UTF-8 ({e.reason} at byte {e.start})") from None
    return split_front_matter(text, path)


def read_license(path: Path) -> License:
    meta, body = _read(path)
    for field in ("key", "category"):
        if not isinstance(meta.get(field), str) or not meta[field]:
            raise LicenseDBError(f"{path}: front matter has no {field!r}")
    if meta["key"] != path.stem:
        raise LicenseDBError(f"{path}: key {meta['key']!r} differs from the file name")
    return License(key=meta["key"], name=str(meta.get("name") or meta["key"]), category=meta["category"],
                   spdx=meta.get("spdx_license_key"), text=body, deprecated=bool(meta.get("is_deprecated")))


def read_rule(path: Path, known: set[str] | dict | None = None) -> Rule:
    """One ``.RULE`` file; with ``known`` (license keys), an expression naming another key is an error."""
    meta, body = _read(path)
    kinds = [kind for flag, kind in RULE_KINDS.items() if meta.get(flag)]
    if len(kinds) != 1:
        raise LicenseDBError(f"{path}: a rule must have exactly one of {', '.join(RULE_KINDS)}, got {kinds or 'none'}")
    expression = meta.get("license_expression")
    if kinds[0] == "false_positive" and not expression:
        expression = ""
    elif not isinstance(expression, str):
        raise LicenseDBError(f"{path}: front matter has no license_expression")
    else:
        try:
            keys = expression_keys(expression)
        except ValueError as e:
            raise LicenseDBError(f"{path}: {e}") from None
        unknown = [k for k in keys if known is not None and k not in known]
        if unknown:
            raise LicenseDBError(f"{path}: license_expression {expression!r} names unknown license "
                                 f"key(s) {', '.join(unknown)}")
    return Rule(name=path.stem, expression=expression, kind=kinds[0], text=body)


# ---- the database ---------------------------------------------------------------------------------
def default_data_dir() -> Path:
    """``licensedcode/data`` of the installed ``licensedcode-data`` package (the ``longdoc`` extra)."""
    from importlib import resources

    try:
        root = resources.files("licensedcode") / "data"
    except ModuleNotFoundError:
        raise LicenseDBError("the ScanCode LicenseDB is not installed: pip install 'longattn[longdoc]' "
                             "(licensedcode-data), or pass --data-dir") from None
    return Path(str(root))


def load_licensedb(data_dir: Path | str | None = None, *, rules: bool = True) -> LicenseDB:
    """Every ``licenses/*.LICENSE`` and (with ``rules``) every ``rules/*.RULE`` (not ``inactive/``) of
    ``data_dir`` (default: the installed package's)."""
    root = Path(data_dir) if data_dir is not None else default_data_dir()
    if not (root / "licenses").is_dir():
        raise LicenseDBError(f"{root}: no licenses/ folder (expected a LicenseDB data directory with "
                             f"licenses/*.LICENSE and rules/*.RULE)")
    licenses = {p.stem: read_license(p) for p in sorted((root / "licenses").glob("*.LICENSE"))}
    if not licenses:
        raise LicenseDBError(f"{root / 'licenses'}: no .LICENSE files")
    found = {}
    if rules:
        if not (root / "rules").is_dir():
            raise LicenseDBError(f"{root}: no rules/ folder")
        found = {p.stem: read_rule(p, licenses) for p in sorted((root / "rules").glob("*.RULE"))}
    return LicenseDB(licenses=licenses, rules=found, source=root)
