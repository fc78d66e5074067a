"""The ``redact_rules`` file: where a scanner burns text into its images, in RSNA CTP's script format.

Rules file: the RSNA CTP DicomPixelAnonymizer script format, so a site's existing script (or
CTP's contributed "Burned-in Annotation Library") is used as it is, wherever it names elements
by tag or by a keyword pydicom spells the same (Modality, Rows, Manufacturer...; a dcm4che-only
name such as SeqOfUltrasoundRegions is an error naming the line). A section is a signature in
braces followed by one or more regions ``(x,y,w,h)`` (left, top, width, height in pixels)::

    GE LOGIQ banner
    { Modality.equals("US") * Manufacturer.containsIgnoreCase("GE") *
      Rows.equals("600") * Columns.equals("800") }
    (0,0,800,60)

Text outside braces and parentheses is a comment (it may not contain either). Signatures use
``+`` (or), ``*`` (and), ``!`` (not), parentheses, ``true.``/``false.`` and terms
``identifier.method("string")``; an identifier is a DICOM keyword (pydicom's spelling) or a tag
``[gggg,eeee]``, and ``A::B`` reads B in the first item of sequence A. Methods: `_METHODS`.
A value is the element's string form (multiple values joined by ``\\``; absent: ``""``). The
first matching section wins, as in CTP. Anything the parser does not understand is a
`ConfigError` naming the file and line, never a rule silently skipped.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence as DicomSequence
from pydicom.tag import Tag

from medscale.errors import ConfigError
from medscale.prep.regions import Box

__all__ = ["Rule", "load_rules", "parse_rules"]


@dataclass(frozen=True)
class Rule:
    """One section of a rules file: where its signature starts, the test, the boxes it blanks."""

    source: str
    line: int
    matches: Callable[[Dataset], bool]
    boxes: tuple[Box, ...]


_METHODS: dict[str, Callable[[str, str], bool]] = {
    "equals": lambda v, a: v == a,
    "equalsIgnoreCase": lambda v, a: v.lower() == a.lower(),
    "matches": lambda v, a: re.fullmatch(a, v) is not None,  # Java's String.matches is a full match
    "contains": lambda v, a: a in v,
    "containsIgnoreCase": lambda v, a: a.lower() in v.lower(),
    "startsWith": lambda v, a: v.startswith(a),
    "startsWithIgnoreCase": lambda v, a: v.lower().startswith(a.lower()),
    "endsWith": lambda v, a: v.endswith(a),
    "endsWithIgnoreCase": lambda v, a: v.lower().endswith(a.lower()),
}
_IDENT = r"(?:\[[0-9A-Fa-f]{4},[0-9A-Fa-f]{4}\]|[A-Za-z][A-Za-z0-9]*)"
_CALL = re.compile(rf'({_IDENT}(?:::{_IDENT})*)\.([A-Za-z]+)\(\s*"((?:[^"\\]|\\.)*)"\s*\)')
_REGION = re.compile(r"\(\s*(-?\d+)\s*,\s*(-?\d+)\s*,\s*(\d+)\s*,\s*(\d+)\s*\)")


def load_rules(path: str | os.PathLike) -> list[Rule]:
    """Parse a rules file (CTP DicomPixelAnonymizer script; module docstring).

    Raises:
        ConfigError: unreadable file, or a syntax error, unknown keyword or method, bad regular
            expression or malformed region, naming the file and line.
    """
    p = Path(path).resolve()
    try:
        st = p.stat()
    except OSError as e:
        raise ConfigError(f"cannot read redact_rules file {p}: {e.strerror or e}") from e
    return list(_load_rules_cached(str(p), st.st_mtime_ns, st.st_size))


@lru_cache(maxsize=8)
def _load_rules_cached(path: str, mtime_ns: int, size: int) -> tuple[Rule, ...]:
    # Cached (keyed on the file's version): require_ocr parses it in the driver, then every
    # worker's context needs it again.
    try:
        text = Path(path).read_text(encoding="utf-8", errors="strict")
    except OSError as e:
        raise ConfigError(f"cannot read redact_rules file {path}: {e.strerror or e}") from e
    except UnicodeDecodeError as e:
        raise ConfigError(f"redact_rules file {path} is not UTF-8 text ({e})") from e
    return tuple(parse_rules(text, path))


def parse_rules(text: str, source: str = "<rules>") -> list[Rule]:
    """Parse rules from a string; `source` names it in error messages."""
    rules: list[Rule] = []
    sig: tuple[int, Callable[[Dataset], bool]] | None = None
    boxes: list[Box] = []
    i = 0

    def line_of(pos: int) -> int:
        return text.count("\n", 0, pos) + 1

    def close_section() -> None:
        if sig is not None:
            if not boxes:
                raise ConfigError(f"{source}, line {sig[0]}: the signature has no region (x,y,w,h) after it")
            rules.append(Rule(source, sig[0], sig[1], tuple(boxes)))

    while i < len(text):
        ch = text[i]
        if ch == "{":
            end = text.find("}", i)
            if end < 0:
                raise ConfigError(f"{source}, line {line_of(i)}: '{{' is never closed by '}}'")
            close_section()
            sig, boxes = (line_of(i), _parse_signature(text[i + 1:end], source, line_of(i))), []
            i = end + 1
        elif ch == "(":
            end = text.find(")", i)
            m = _REGION.fullmatch(text, i, end + 1) if end >= 0 else None
            if m is None:
                raise ConfigError(f"{source}, line {line_of(i)}: a region must be (x,y,w,h) with integers, got "
                                  f"{text[i:end + 1 if end >= 0 else i + 40]!r} (comments may not contain parentheses)")
            if sig is None:
                raise ConfigError(f"{source}, line {line_of(i)}: region {m.group(0)} comes before any {{signature}}")
            x, y, w, h = (int(g) for g in m.groups())
            if w <= 0 or h <= 0:
                raise ConfigError(f"{source}, line {line_of(i)}: region {m.group(0)} has no area (width, height > 0)")
            boxes.append(Box(x, y, w, h))
            i = end + 1
        elif ch in "})":
            raise ConfigError(f"{source}, line {line_of(i)}: unmatched {ch!r} (comments may not contain braces "
                              "or parentheses)")
        else:
            i += 1
    close_section()
    return rules


def _parse_signature(expr: str, source: str, line: int) -> Callable[[Dataset], bool]:
    """Compile a CTP signature: ``+`` (or) binds loosest, then ``*`` (and), then ``!`` (not)."""
    tokens: list[Any] = []
    pos = 0
    while pos < len(expr):
        if expr[pos].isspace():
            pos += 1
            continue
        where = f"{source}, line {line + expr.count(chr(10), 0, pos)}"
        if expr[pos] in "+*!()":
            tokens.append(expr[pos])
            pos += 1
        elif expr.startswith(("true.", "false."), pos):
            value = expr.startswith("true.", pos)
            tokens.append(("const", value))
            pos += 5 if value else 6
        elif m := _CALL.match(expr, pos):
            tokens.append(("call", _compile_call(m, where)))
            pos = m.end()
        else:
            raise ConfigError(f"{where}: cannot read the signature at {expr[pos:pos + 40].strip()!r}; expected "
                              'identifier.method("string"), true., false., +, *, ! or parentheses')
    parser = _Parser(tokens, f"{source}, line {line}")
    test = parser.expr()
    if parser.i != len(tokens):
        raise ConfigError(f"{source}, line {line}: unexpected {tokens[parser.i]!r} in the signature")
    return test


def _compile_call(m: re.Match, where: str) -> Callable[[Dataset], bool]:
    path, method, arg = m.group(1), m.group(2), re.sub(r"\\(.)", r"\1", m.group(3))
    fn = _METHODS.get(method)
    if fn is None:
        raise ConfigError(f"{where}: unknown method {method!r}; known: {', '.join(_METHODS)}")
    if method == "matches":
        try:
            re.compile(arg)
        except re.error as e:
            raise ConfigError(f"{where}: bad regular expression {arg!r} in matches(): {e}") from None
    tags = []
    for ident in path.split("::"):
        if ident.startswith("["):
            tags.append(Tag(int(ident[1:5], 16), int(ident[6:10], 16)))
        else:
            tag = tag_for_keyword(ident)
            if tag is None:
                raise ConfigError(f"{where}: {ident!r} is not a DICOM keyword (pydicom's spelling, e.g. "
                                  "SequenceOfUltrasoundRegions); write its tag as [gggg,eeee]")
            tags.append(Tag(tag))
    return lambda ds: fn(_value(ds, tags), arg)


class _Parser:
    def __init__(self, tokens: list[Any], where: str) -> None:
        self.tokens, self.i, self.where = tokens, 0, where

    def _peek(self) -> Any:
        return self.tokens[self.i] if self.i < len(self.tokens) else None

    def expr(self) -> Callable[[Dataset], bool]:
        terms = [self.term()]
        while self._peek() == "+":
            self.i += 1
            terms.append(self.term())
        return terms[0] if len(terms) == 1 else (lambda ds: any(t(ds) for t in terms))

    def term(self) -> Callable[[Dataset], bool]:
        factors = [self.factor()]
        while self._peek() == "*":
            self.i += 1
            factors.append(self.factor())
        return factors[0] if len(factors) == 1 else (lambda ds: all(f(ds) for f in factors))

    def factor(self) -> Callable[[Dataset], bool]:
        tok = self._peek()
        self.i += 1
        if tok == "!":
            inner = self.factor()
            return lambda ds: not inner(ds)
        if tok == "(":
            inner = self.expr()
            if self._peek() != ")":
                raise ConfigError(f"{self.where}: '(' is never closed in the signature")
            self.i += 1
            return inner
        if isinstance(tok, tuple):
            if tok[0] == "const":
                value = tok[1]
                return lambda ds: value
            return tok[1]
        raise ConfigError(f"{self.where}: expected a term, got {tok if tok is not None else 'the end'!r}")


def _value(ds: Dataset, tags: Sequence[Tag]) -> str:
    """An element's value as CTP compares it: its string form, values joined by backslash, "" if absent."""
    node: Any = ds
    for n, tag in enumerate(tags):
        if not isinstance(node, Dataset) or tag not in node:
            return ""
        value = node[tag].value
        if n < len(tags) - 1:
            if not isinstance(value, DicomSequence) or not value:
                return ""
            node = value[0]
            continue
        if value is None:
            return ""
        if isinstance(value, (bytes, bytearray)):
            return value.decode("latin-1").strip(" \x00")
        if isinstance(value, DicomSequence):
            return ""
        if isinstance(value, MultiValue):
            return "\\".join(str(v) for v in value)
        return str(value).strip()
    return ""
