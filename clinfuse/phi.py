"""The PHI guard: nothing identifying reaches MLflow, and no identifier stays in a report's model text.

Before anything is logged (params, tags, metric names, dataset fields, every artifact file's bytes)
it is screened against the cohort's identifying values (``<cohort>/private/identifiers.json``:
patient names, IDs, birth dates, UIDs, accession numbers, original keys); a purely numeric value
counts only where no other digit touches it, and not inside a hexadecimal digest (a checksum is
computed, never typed). A hit raises
:class:`PhiError`; the message names where and which *kind* of identifier, never the value.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from .errors import ClinfuseError

__all__ = ["PhiGuard", "PhiError", "REDACTED", "replace_spans"]

REDACTED = "[ID]"

_MIN_LEN = 5  # shorter values (e.g. a 4-letter name part) would match ordinary words


class PhiError(ClinfuseError):
    """Something about to be logged contains a patient identifier."""


_NON_ALNUM = re.compile(r"[^0-9a-z]+")
_TAG = re.compile(r"<[^>]{0,500}>")
_WORD = re.compile(r"[^\W\d_]+")  # runs of letters
_DIGITS = re.compile(r"\d{%d,}" % _MIN_LEN)
_UID_LIKE = re.compile(r"\d+(\.\d+)+")
# an inlined image (explanation.html carries its overlay so): binary data, not text, where any 5-letter
# name part turns up by chance about once per few hundred pages
_DATA_URI = re.compile(r"data:[\w/+.-]{1,100};base64,[A-Za-z0-9+/=\s]+")


def _variants(kind: str, value: str) -> set[str]:
    """The forms in which a value may be typed: as stored, names in either order, dates in common
    formats, and the digit run of an ID or accession number (``mrn 44363330`` for ``MRN44363330``)."""
    v = value.strip()
    out = {v}
    if kind == "patient_name" and "^" in v:
        parts = [p for p in v.split("^") if p]
        out |= {" ".join(parts), " ".join(reversed(parts)), ", ".join(parts)}
        out |= {p for p in parts if len(p) >= _MIN_LEN}
    if kind == "birth_date" and re.fullmatch(r"\d{8}", v):
        y, m, d = v[:4], v[4:6], v[6:]
        out |= {f"{y}-{m}-{d}", f"{d}/{m}/{y}", f"{m}/{d}/{y}", f"{d}.{m}.{y}", f"{d}-{m}-{y}", f"{y}/{m}/{d}",
                f"{y}.{m}.{d}", f"{m}-{d}-{y}", f"{d}{m}{y}", f"{m}{d}{y}"}
    if kind in ("patient_id", "accession", "key", "other_id") and not _UID_LIKE.fullmatch(v):
        out |= set(_DIGITS.findall(v))
    return {x for x in out if len(x) >= _MIN_LEN}


def _normal(text: str) -> str:
    """Lower case, HTML tags removed, every run of other characters one space: 'KIM^MIN', 'Kim, Min' and
    '25.05.2002' compare as 'kim min' and '25 05 2002'."""
    return " ".join(_NON_ALNUM.sub(" ", _TAG.sub(" ", text.lower())).split())


def _words(text: str) -> str:
    """Only the words (runs of letters) of a text, one space apart: a name split over HTML spans or JSON
    items (``["min", 0.31], ["kim", -0.12]``) reads 'min kim' again."""
    return " ".join(_WORD.findall(_TAG.sub(" ", text.lower())))


class PhiGuard:
    """Screens text and files for identifying values.

    Every variant of every identifier goes into one Aho-Corasick automaton (``pyahocorasick``), so a
    text is screened in one pass whatever the number of identifiers: the work per character is
    constant, and the only Python-level work is one boundary check per actual occurrence of an
    identifier (identifiers that share a prefix, as accession numbers do, cost nothing extra).

    Args:
        identifiers: kind -> values (as in ``private/identifiers.json``).
    """

    def __init__(self, identifiers: dict[str, list[str]] | None = None):
        self.identifiers = {k: list(v) for k, v in (identifiers or {}).items()}
        self.kind_of: dict[str, str] = {}
        self._uids: set[str] = set()
        for kind, values in (identifiers or {}).items():
            for v in values:
                for x in _variants(kind, str(v)):
                    if _UID_LIKE.fullmatch(x):
                        # a UID is copied by machines, not typed: only its own dotted form, looked up in a
                        # set (three UIDs per file were 95% of the automaton's nodes, 120 MiB at 21,608 files)
                        self.kind_of.setdefault(x, kind)  # (_variants keeps no value under _MIN_LEN)
                        self._uids.add(x)
                        continue
                    for form in {x.lower(), _normal(x)}:  # as typed, and as the normalised views read it
                        if len(form) >= _MIN_LEN:
                            self.kind_of.setdefault(form, kind)
        self._uid_max = max(map(len, self._uids), default=0)
        self._automaton = None
        self._idents = [x for x in self.kind_of if x not in self._uids]  # the automaton stores an index (STORE_INTS)
        if self._idents:
            import ahocorasick

            a = ahocorasick.Automaton(ahocorasick.STORE_INTS)
            for i, ident in enumerate(self._idents):
                a.add_word(ident, i)
            a.make_automaton()
            self._automaton = a

    @classmethod
    def from_cohort(cls, cohort_dir: str | Path) -> "PhiGuard":
        """The guard of a cohort (its ``private/identifiers.json``).

        Raises:
            PhiError: the cohort has no identifier list: tracking it unguarded is refused.
        """
        f = Path(cohort_dir) / "private" / "identifiers.json"
        if not f.is_file():
            raise PhiError(f"{cohort_dir}: no private/identifiers.json, so nothing logged could be screened for "
                           "patient identifiers; refusing to track this cohort (rebuild it with `clinfuse cohort "
                           "build`, or train with --no-mlflow)")
        return cls(json.loads(f.read_text()))

    def with_secrets(self, secrets: list[str]) -> "PhiGuard":
        """This guard, also screening for `secrets` (passwords, tokens: kind 'credential')."""
        values = [s for s in secrets if s]
        if not values:
            return self
        return PhiGuard({**self.identifiers, "credential": self.identifiers.get("credential", []) + values})

    def __len__(self) -> int:
        return len(self.kind_of)

    def find(self, text: str) -> str | None:
        """The kind of the first identifier found in `text`, or None.

        Three views of the text are screened, each in one pass: as it is (lower case), normalised
        (HTML tags gone, every run of punctuation and space one space), and its words alone (so a name
        split over HTML spans or JSON items is seen whole)."""
        if not self.kind_of or not text or len(text) < _MIN_LEN:
            return None
        low = text.lower()
        if "base64," in low:
            low = _DATA_URI.sub(" ", low)
        for _, _, kind in self._uid_hits(low):
            return kind
        if self._automaton is None:
            return None
        for view in (low, _normal(low), _words(low)):
            n = len(view)
            # iter() reports every occurrence, overlapping ones included, by the index of its last character
            for end, i in self._automaton.iter(view):
                ident = self._idents[i]
                if not ident.isdigit() or _numeric_hit(view, end - len(ident) + 1, end + 1, n):
                    return self.kind_of[ident]
        return None

    def redact(self, text: str, token: str = REDACTED) -> tuple[str, int]:
        """`text` with every identifier found in it (as typed, any case) replaced by `token`, and how many.

        The cohort builder does this to every report (:meth:`spans`, then :func:`replace_spans`), so that no
        identifier typed in a report (an MRN, a birth date, a name in either order) reaches the model's
        text, its vocabulary or an explanation.
        """
        return replace_spans(text, self.spans(text), token)

    def spans(self, text: str) -> list[tuple[int, int]]:
        """(start, end) of every identifier found in `text` (as typed, any case), possibly overlapping."""
        if not self.kind_of or not text:
            return []
        low = text.lower()
        if len(low) != len(text):  # a character whose lower case is longer: positions would not map
            low = "".join(c if len(c.lower()) != 1 else c.lower() for c in text)
        spans = [(a, b) for a, b, _ in self._uid_hits(low)]
        n = len(low)
        for end, i in (self._automaton.iter(low) if self._automaton is not None else ()):
            ident = self._idents[i]
            start = end - len(ident) + 1
            if not ident.isdigit() or _numeric_hit(low, start, end + 1, n):
                spans.append((start, end + 1))
        return spans

    def _uid_hits(self, low: str):
        """(start, end, kind) of every UID of the export in `low` that stands as whole components of a
        dotted number: no digit touches it, as for numeric identifiers ('1.2.3.4.5' is in
        '1.2.3.4.5.dcm' and in '9.1.2.3.4.5', not in '1.2.3.4.56'). One regex pass finds the dotted
        numbers; each run of their components up to the longest UID's length is a set lookup."""
        if not self._uids:
            return
        for m in _UID_LIKE.finditer(low):
            token, base = m.group(), m.start()
            if len(token) < _MIN_LEN:
                continue
            dots = [i for i, c in enumerate(token) if c == "."]
            starts, ends = [0] + [d + 1 for d in dots], dots + [len(token)]  # component i is token[starts[i]:ends[i]]
            for i, a in enumerate(starts):
                for b in ends[i + 1:]:  # two components at least
                    if b - a > self._uid_max:
                        break
                    if token[a:b] in self._uids:
                        yield base + a, base + b, self.kind_of[token[a:b]]

    def check(self, where: str, *texts) -> None:
        """Raise PhiError if any of `texts` holds an identifier."""
        for t in texts:
            kind = self.find(str(t))
            if kind:
                raise PhiError(f"PHI guard: refused to log {where}: it contains a patient identifier "
                               f"(kind: {kind}); nothing was logged")

    def check_file(self, path: str | Path, where: str | None = None) -> None:
        """Screen a file (or every file under a folder).

        Text of any kind is screened whole. Of a ``.safetensors`` or ``.npy`` file only the header
        (tensor names, dtypes, shapes, metadata) is screened: the rest is numbers.
        """
        p = Path(path)
        files = sorted(x for x in p.rglob("*") if x.is_file()) if p.is_dir() else [p]
        for f in files:
            self.check(where or f"artifact '{f.name}'", _screenable_text(f))


def replace_spans(text: str, spans: list[tuple[int, int]], token: str = REDACTED) -> tuple[str, int]:
    """`text` with each run of overlapping or touching spans replaced by one `token`, and how many runs."""
    if not spans:
        return text, 0
    spans = sorted(spans)
    merged = [list(spans[0])]
    for a, b in spans[1:]:
        if a <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], b)
        else:
            merged.append([a, b])
    out, last = [], 0
    for a, b in merged:
        out += [text[last:a], token]
        last = b
    out.append(text[last:])
    return "".join(out), len(merged)


_HEX = frozenset("0123456789abcdef")
_DIGEST_LEN = 32  # an MD5 is 32 hex digits, a SHA-256 64: no identifier is typed as such a run


def _numeric_hit(text: str, start: int, end: int, n: int) -> bool:
    """A numeric identifier at text[start:end] counts: no digit touches it and it is not part of a digest."""
    return _digits_alone(text, start, end, n) and not _in_digest(text, start, end, n)


def _in_digest(text: str, start: int, end: int, n: int) -> bool:
    """text[start:end] lies in a run of at least 32 hexadecimal characters with a letter in it (a checksum
    such as the SHA-256 a cohort.json lists for its files: 'f00292f' holds accession CN00292's digits).
    Reads at most 32 characters either side, so the check costs the same whatever the text."""
    a = start
    while a > 0 and start - a < _DIGEST_LEN and text[a - 1] in _HEX:
        a -= 1
    b = end
    while b < n and b - end < _DIGEST_LEN and text[b] in _HEX:
        b += 1
    run = text[a:b]
    return b - a >= _DIGEST_LEN and not run.isdigit()


def _digits_alone(text: str, start: int, end: int, n: int) -> bool:
    """A numeric identifier counts only where no digit touches it: patient 12345 is not in 1123456
    (a parameter count, a timestamp), but it is in 'MRN12345' and 'id=12345'."""
    return (start == 0 or not text[start - 1].isdecimal()) and (end == n or not text[end].isdecimal())


def _png_text(data: bytes) -> str:
    """The text chunks of a PNG (tEXt, iTXt, zTXt: where a writer puts metadata); the pixels are numbers."""
    import struct
    import zlib

    out, i = [], 8
    while i + 8 <= len(data):
        n, kind = struct.unpack(">I4s", data[i:i + 8])
        body = data[i + 8:i + 8 + n]
        if kind in (b"tEXt", b"iTXt"):
            out.append(body.decode("latin-1"))
        elif kind == b"zTXt":
            key, _, rest = body.partition(b"\0")
            try:
                out.append(key.decode("latin-1") + " " + zlib.decompress(rest[1:]).decode("latin-1"))
            except zlib.error:
                out.append(body.decode("latin-1"))
        i += 12 + n
    return "\n".join(out)


def _screenable_text(f: Path) -> str:
    with open(f, "rb") as fh:
        if f.suffix.lower() == ".png":
            data = fh.read()
            if data[:8] == b"\x89PNG\r\n\x1a\n":
                return _png_text(data)
            return data.decode("latin-1")
        if f.suffix == ".safetensors":
            n = int.from_bytes(fh.read(8), "little")
            return fh.read(min(n, 100 * 2**20)).decode("latin-1")
        if f.suffix == ".npy":
            return fh.read(4096).decode("latin-1")  # magic, version, header dict (dtype, shape)
        return fh.read().decode("latin-1")
