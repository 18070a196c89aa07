"""Radiology report text: reading (CSV, JSON lines, a folder of .txt), decoding, sections, de-id tokens."""

from __future__ import annotations

import codecs
import csv
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

from ..config import ReportConfig
from .quarantine import CohortInputError, KeyedRecords, QuarantineEntry

__all__ = ["Report", "ReportTable", "decode_bytes", "split_sections", "model_text", "clean_text", "load_reports",
           "prepare_report"]


@dataclass
class Report:
    """One report: its sections after cleaning and where it came from."""

    sections: dict[str, str]
    text: str  # what the model reads: the chosen sections with their headings
    source: str
    patient: str | None = None


@dataclass
class ReportTable:
    reports: dict[str, Report]
    quarantine: list[QuarantineEntry]  # or the QuarantineFile it was given
    warnings: list[str]
    n_records: int


_BOM = b"\xef\xbb\xbf"


def _fallback(encoding: str, fallback: str, first_bad: int, decodes) -> tuple[str, str]:
    """The policy shared by :func:`decode_bytes` and :func:`open_text` once `encoding` failed at byte
    `first_bad`: `fallback` if ``decodes(fallback)``, else latin-1 (decodes every byte string); returns
    (the encoding chosen, the warning that names it)."""
    chosen = fallback if decodes(fallback) else "latin-1"
    return chosen, f"not valid {encoding} (first bad byte at offset {first_bad}); decoded as {chosen}"


def decode_bytes(data: bytes, encoding: str = "utf-8", fallback: str = "cp1252") -> tuple[str, str | None]:
    """Decode text; on failure try `fallback`, then latin-1 (never fails). Returns (text, warning)."""
    if data.startswith(_BOM):
        data = data[3:]
    try:
        return data.decode(encoding), None
    except UnicodeDecodeError as e:
        first_bad = e.start

    text = {}  # what the test decoded, returned as it is (not decoded a second time)

    def decodes(enc: str) -> bool:
        try:
            text[enc] = data.decode(enc)
            return True
        except UnicodeDecodeError:
            return False

    chosen, warning = _fallback(encoding, fallback, first_bad, decodes)
    return (text[chosen] if chosen in text else data.decode(chosen)), warning


_CHUNK = 1 << 20


def _decodes(path: Path, encoding: str, skip: int) -> int | None:
    """None when the file (past `skip` bytes) decodes as `encoding`, else the offset of the first bad byte."""
    dec = codecs.getincrementaldecoder(encoding)()
    done = skip
    with open(path, "rb") as f:
        f.seek(skip)
        while True:
            chunk = f.read(_CHUNK)
            pending = len(dec.getstate()[0])  # bytes of a character cut by the last chunk, decoded with this one
            try:
                dec.decode(chunk, final=not chunk)
            except UnicodeDecodeError as e:
                return done - pending + e.start
            if not chunk:
                return None
            done += len(chunk)


class _Hashing(io.RawIOBase):
    """A binary file that feeds what is read from it to `digest` (None: nothing)."""

    def __init__(self, f, digest):
        self.f, self.digest = f, digest

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.f.readinto(b)
        if n and self.digest is not None:
            self.digest.update(memoryview(b)[:n])
        return n

    def close(self) -> None:
        self.f.close()
        super().close()


def open_text(path: Path, tag: str, digest=None, encoding: str = "utf-8", fallback: str = "cp1252"):
    """A text file opened as :func:`decode_bytes` would decode it, read as a stream (a hospital's reports file
    is never held whole): ``(text stream, warning or None)``. The encoding is found by a first pass; the
    second, the one parsed, feeds `digest` the file's bytes tagged `tag` (as ``_feed`` does)."""
    with open(path, "rb") as f:
        skip = 3 if f.read(3) == _BOM else 0
    warning = None
    bad = _decodes(path, encoding, skip)
    if bad is not None:
        encoding, warning = _fallback(encoding, fallback, bad - skip, lambda enc: _decodes(path, enc, skip) is None)
    if digest is not None:
        digest.update(tag.encode() + b"\0")
    raw = _Hashing(open(path, "rb"), digest)
    if skip:
        raw.read(skip)
    return io.TextIOWrapper(io.BufferedReader(raw, _CHUNK), encoding=encoding, newline=""), warning


def _heading_re(sections: list[str]) -> re.Pattern:
    names = "|".join(re.escape(s) for s in sorted(sections, key=len, reverse=True))
    return re.compile(rf"(?:^|(?<=[\s.;]))({names})\s*:", re.IGNORECASE)


def clean_text(text: str, cfg: ReportConfig) -> str:
    """Replace de-identification tokens by one token and normalise whitespace."""
    for pat in cfg.deid_patterns:
        text = re.sub(pat, cfg.deid_token, text)
    return " ".join(text.split())


def split_sections(text: str, sections: list[str]) -> dict[str, str]:
    """Split a report into its sections (headings like ``FINDINGS:``, case-insensitive).

    Text before the first heading counts as FINDINGS. A heading that appears twice is joined.

    Example:
        >>> split_sections("INDICATION: cough. FINDINGS: clear lungs.", ["INDICATION", "FINDINGS"])
        {'INDICATION': 'cough.', 'FINDINGS': 'clear lungs.'}
    """
    out: dict[str, str] = {}
    matches = list(_heading_re(sections).finditer(text))
    canon = {s.upper(): s for s in sections}
    pre = text[: matches[0].start()] if matches else text
    if pre.strip():
        out["FINDINGS"] = pre.strip()
    for i, m in enumerate(matches):
        end = matches[i + 1].start() if i + 1 < len(matches) else len(text)
        body = text[m.end() : end].strip()
        name = canon[m.group(1).upper()]
        if body:
            out[name] = f"{out[name]} {body}".strip() if name in out else body
    return out


def model_text(sections: dict[str, str], read_sections: list[str]) -> str:
    """The text the model reads: the chosen sections, in order, with their headings; '' if none."""
    upper = {k.upper(): v for k, v in sections.items()}
    parts = [f"{name.upper()}: {upper[name.upper()]}" for name in read_sections if upper.get(name.upper())]
    return " ".join(parts)


def prepare_report(raw: str, cfg: ReportConfig) -> str:
    """The text the model reads from a raw report, exactly as the cohort builder makes it
    (cleaned, split into sections, the configured sections kept with their headings)."""
    return _make_report(raw, cfg, "", None).text


def _make_report(raw: str, cfg: ReportConfig, source: str, patient: str | None) -> Report:
    cleaned = clean_text(raw, cfg)
    sections = split_sections(cleaned, cfg.sections)
    return Report(sections, model_text(sections, cfg.read_sections), source, patient)


def _records_from_file(path: Path, key_column: str, cfg: ReportConfig, warnings: list[str], digest=None):
    """Yield (row_label, key, text, patient) from a CSV or JSON-lines file, read as a stream."""
    f, warn = open_text(path, "report", digest, cfg.encoding, cfg.fallback_encoding)
    if warn:
        warnings.append(f"{path}: {warn}")
    with f:
        yield from _parse_records(f, path, key_column, cfg)


def _json_lines(f):
    """The lines of a text stream as ``str.splitlines`` splits them (also at \\x0b, \\x0c, \\x1c-\\x1e,
    \\x85, U+2028, U+2029), without holding the whole text."""
    for line in f:
        yield from line.splitlines()


def _parse_records(f, path: Path, key_column: str, cfg: ReportConfig):
    if path.suffix.lower() in (".jsonl", ".ndjson", ".json"):
        for i, line in enumerate(_json_lines(f), start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                yield f"{path}:line {i}", None, f"invalid JSON ({e.msg})", None
                continue
            if not isinstance(rec, dict):
                yield f"{path}:line {i}", None, f"a JSON {type(rec).__name__ if rec is not None else 'null'}, " \
                    "not an object with the key and the report", None
                continue
            if not isinstance(rec.get(cfg.text_column, ""), (str, type(None))):
                yield f"{path}:line {i}", None, f"'{cfg.text_column}' is a {type(rec[cfg.text_column]).__name__}, not text", None
                continue
            if key_column not in rec:
                raise CohortInputError(
                    f"{path}: line {i} has no key '{key_column}' (keys: {', '.join(rec)}); "
                    f"set cohort.reports.key_column or --reports-key"
                )
            yield f"{path}:line {i}", str(rec.get(key_column) or ""), rec.get(cfg.text_column), \
                rec.get(cfg.patient_column) if cfg.patient_column else None
        return
    reader = csv.DictReader(f)
    _allow_long_fields()
    cols = reader.fieldnames or []
    for needed, flag in ((key_column, "--reports-key / cohort.reports.key_column"),
                         (cfg.text_column, "--report-column / cohort.reports.text_column")):
        if needed not in cols:
            raise CohortInputError(f"{path}: column '{needed}' not found (columns: {', '.join(cols)}); set {flag}")
    for i, row in enumerate(reader, start=2):
        yield f"{path}:row {i}", (row.get(key_column) or "").strip(), row.get(cfg.text_column), \
            (row.get(cfg.patient_column) or None) if cfg.patient_column else None


def _allow_long_fields() -> None:
    """Python's csv module refuses fields over 128 kB by default; a long report or a pasted cell is not
    an error of the file, so the limit is raised to what a file in memory can hold."""
    import sys

    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))


def _feed(digest, tag: str, data: bytes) -> None:
    """Add the bytes of one input file, as parsed, to the cohort fingerprint (`digest`; None: no fingerprint)."""
    if digest is not None:
        digest.update(tag.encode() + b"\0" + data)


def open_keyed_csv(path: Path, key_column: str, what: str, key_setting: str, digest=None):
    """A CSV of records keyed by `key_column` (labels, variables): ``(reader, columns, warnings)``;
    `digest` is fed the bytes parsed, tagged `what`.

    Raises:
        CohortInputError: the file is missing or lacks the key column (the message names `key_setting`).
    """
    if not path.is_file():
        raise CohortInputError(f"{path}: {what} file not found")
    f, warn = open_text(path, what, digest)
    _allow_long_fields()
    reader = _ClosingDictReader(f)
    cols = list(reader.fieldnames or [])
    if key_column not in cols:
        f.close()
        raise CohortInputError(f"{path}: key column '{key_column}' not found (columns: {', '.join(cols)}); "
                               f"set {key_setting}")
    return reader, cols, ([f"{path}: {warn}"] if warn else [])


class _ClosingDictReader(csv.DictReader):
    """A DictReader over a file it closes when the rows run out (the file is read as a stream)."""

    def __init__(self, f):
        super().__init__(f)
        self._file = f

    def __next__(self):
        try:
            return super().__next__()
        except StopIteration:
            self._file.close()
            raise

    def close(self) -> None:
        self._file.close()


def _report_json(r: Report) -> str:
    return json.dumps([r.sections, r.text, r.source, r.patient])


def _report_from_json(text: str) -> Report:
    return Report(*json.loads(text))


def load_reports(path: str | Path, key_column: str, cfg: ReportConfig, digest=None, store=None,
                 quarantine=None) -> ReportTable:
    """Read reports keyed by `key_column` from a CSV, a JSON-lines file or a folder of ``<key>.txt``.

    Empty reports and conflicting duplicates are quarantined; identical duplicates are merged. `digest`
    is fed the bytes parsed, file by file (see ``load_labels``). With `store` (a cohort build's
    :class:`~clinfuse.data.buildstore.BuildStore`) the reports are kept there, not in memory, and
    ``reports`` is a read-only mapping over them. What is set aside goes to `quarantine` (a list, or the
    build's ``QuarantineFile``, which writes each entry as it comes) and is the table's ``quarantine``.

    Raises:
        CohortInputError: the source is missing or has no key/text column.
    """
    path = Path(path)
    warnings: list[str] = []
    quarantine = [] if quarantine is None else quarantine
    if not path.exists():
        raise CohortInputError(f"{path}: reports not found; pass a CSV, a JSON-lines file or a folder of .txt files")
    if path.is_dir():
        candidates = sorted(path.rglob("*.txt"))
        files = [p for p in candidates if p.is_file()]
        for p in candidates:
            if not p.is_file():  # a folder, a dangling link or a FIFO named *.txt
                what = "a dangling link" if p.is_symlink() and not p.exists() else \
                    "a folder" if p.is_dir() else "not a regular file"
                quarantine.append(QuarantineEntry("report", str(p), f"{what} named *.txt; skipped"))
        if not files:
            raise CohortInputError(f"{path}: no .txt report files found (expected <key>.txt)")

        def records():
            for f in files:
                try:
                    data = f.read_bytes()
                except OSError as e:
                    yield str(f), None, f"cannot read file: {e.strerror or e}", None
                    continue
                _feed(digest, "report", data)
                text, warn = decode_bytes(data, cfg.encoding, cfg.fallback_encoding)
                if warn:
                    warnings.append(f"{f}: {warn}")
                yield str(f), f.stem, text, None

        rows = records()
    else:
        rows = _records_from_file(path, key_column, cfg, warnings, digest)

    table = store.records("report", _report_json, _report_from_json) if store is not None else None
    records = KeyedRecords("report", "report", quarantine, table)
    n = 0
    for source, key, text, patient in rows:
        n += 1
        if key is None:  # unparseable record; `text` holds the reason
            quarantine.append(QuarantineEntry("report", source, text))
            continue
        if not key:
            quarantine.append(QuarantineEntry("report", source, f"empty key '{key_column}'"))
            continue
        if text is None or not str(text).strip():
            quarantine.append(QuarantineEntry("report", source, "empty report"))
            continue
        rep = _make_report(str(text), cfg, source, patient)
        if not rep.text:
            quarantine.append(QuarantineEntry("report", source, f"no text in the sections read {cfg.read_sections}"))
            continue
        records.add(key, rep, source, same=lambda a, b: a.text == b.text)
    seen = records.kept()
    return ReportTable(seen, quarantine, warnings, n)
