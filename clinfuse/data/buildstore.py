"""The cohort build's working tables, on disk: what it learns per file and per study is written there as
it comes and read back in order, so the build's memory does not grow with the size of the export.

One SQLite file in the cohort's ``private/`` folder (it holds identifiers), deleted when the build ends.
Paths and identifying values are stored as bytes (UTF-8 with surrogate escapes), so a file name that is
not valid UTF-8 is kept as the file system gave it, and ``ORDER BY`` on them is Python's ``sorted`` order
on the strings (UTF-8 byte order is code-point order).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

from .quarantine import QuarantineEntry
from .studies import DicomHeader

__all__ = ["BuildStore", "StoredRecords", "StoredMap"]

_TUPLES = ("position", "orientation", "spacing")


def _b(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _s(b: bytes) -> str:
    return b.decode("utf-8", "surrogateescape")


def header_json(h: DicomHeader) -> str:
    return json.dumps(vars(h))  # its fields are flat (tuples become lists); ensure_ascii: any string survives


def header_from_json(text: str) -> DicomHeader:
    d = json.loads(text)
    for k in _TUPLES:
        if d[k] is not None:
            d[k] = tuple(d[k])
    return DicomHeader(**d)


class BuildStore:
    """Working tables of one cohort build (see the module's docstring).

    Tables: ``files`` (candidate DICOM files, in walk order), ``facts`` (what the scan learned of each:
    fingerprint, join key, header or the reason it was set aside), ``records`` (labels, reports and
    variables by key, :meth:`records`), ``identifiers`` (kind, value: the PHI guard's list), ``rows`` (the
    cohort's rows before redaction and split, with each study's patient and stratum), ``hits`` (identifier
    spans found in each row's report) and ``patients`` (each patient's stratum and split, :meth:`patients`).
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.unlink(missing_ok=True)
        self.db = sqlite3.connect(self.path, isolation_level=None)
        for pragma in ("journal_mode=OFF", "synchronous=OFF", "temp_store=FILE", "cache_size=-16000"):
            self.db.execute(f"PRAGMA {pragma}")  # a scratch file: nothing to recover after a crash
        self.db.executescript("""
            CREATE TABLE files(idx INTEGER PRIMARY KEY, path BLOB NOT NULL);
            CREATE TABLE facts(idx INTEGER PRIMARY KEY, rel BLOB NOT NULL, digest TEXT, key BLOB,
                               header TEXT, reason TEXT);
            CREATE TABLE identifiers(kind TEXT, value BLOB, PRIMARY KEY(kind, value)) WITHOUT ROWID;
            CREATE TABLE rows(seq INTEGER PRIMARY KEY, key BLOB NOT NULL, row TEXT NOT NULL, report TEXT,
                              patient BLOB NOT NULL, pseudonym TEXT NOT NULL, stratum TEXT NOT NULL);
            CREATE TABLE hits(seq INTEGER, a INTEGER, b INTEGER);
            CREATE TABLE records(kind TEXT, key BLOB, value TEXT, source BLOB, conflicted INTEGER,
                                 PRIMARY KEY(kind, key)) WITHOUT ROWID;
        """)
        self.db.execute("BEGIN")
        self.n_files = 0
        self.n_rows = 0
        self._facts: list[tuple] = []
        self._ids: list[tuple[str, bytes]] = []

    def close(self) -> None:
        self.db.close()
        self.path.unlink(missing_ok=True)

    def records(self, kind: str, encode: Callable = json.dumps, decode: Callable = json.loads) -> "StoredRecords":
        """A :class:`~clinfuse.data.quarantine.KeyedRecords` table of this kind (labels, reports) on disk."""
        return StoredRecords(self.db, kind, encode, decode)

    # ---- files and facts
    def add_files(self, paths) -> None:
        """The candidate files, in walk order (numbered from 0 as they come)."""
        batch = []
        for p in paths:
            batch.append((self.n_files, _b(p)))
            self.n_files += 1
            if len(batch) >= 2000:
                self.db.executemany("INSERT INTO files VALUES (?, ?)", batch)
                batch = []
        self.db.executemany("INSERT INTO files VALUES (?, ?)", batch)

    def files(self, batch: int = 2000) -> Iterator[str]:
        """The candidate files in walk order (read in batches: no cursor stays open across the writes)."""
        for start in range(0, self.n_files, batch):
            for (p,) in self.db.execute("SELECT path FROM files WHERE idx >= ? AND idx < ? ORDER BY idx",
                                        (start, start + batch)).fetchall():
                yield _s(p)

    def add_fact(self, idx: int, rel: str, digest: str | None, key: str | None, header: DicomHeader | None,
                 reason: str | None) -> None:
        """What the scan learned of file `idx` (written in batches: call :meth:`flush` when the scan ends)."""
        self._facts.append((idx, _b(rel), digest, _b(key) if key else None,
                            header_json(header) if header is not None else None, reason))
        if len(self._facts) >= 500:
            self.flush()

    def flush(self) -> None:
        """Write what :meth:`add_fact` and :meth:`add_identifiers` hold."""
        self.db.executemany("INSERT INTO facts VALUES (?, ?, ?, ?, ?, ?)", self._facts)
        self.db.executemany("INSERT OR IGNORE INTO identifiers VALUES (?, ?)", self._ids)
        self._facts, self._ids = [], []

    def digests(self) -> Iterator[tuple[bytes, str]]:
        """(relative path as bytes, digest) of every file read, by path."""
        yield from self.db.execute("SELECT rel, digest FROM facts WHERE digest IS NOT NULL ORDER BY rel")

    def scan_quarantine(self) -> Iterator[QuarantineEntry]:
        """The files the scan set aside, in walk order."""
        for p, reason in self.db.execute(
                "SELECT files.path, reason FROM facts JOIN files USING (idx) WHERE header IS NULL ORDER BY idx"):
            yield QuarantineEntry("dicom", _s(p), reason)

    def keyless(self, key: str) -> Iterator[QuarantineEntry]:
        """The readable files without a join key, in walk order."""
        for (p,) in self.db.execute("SELECT files.path FROM facts JOIN files USING (idx) "
                                    "WHERE header IS NOT NULL AND key IS NULL ORDER BY idx"):
            yield QuarantineEntry("dicom", _s(p), f"no {key} in the header; cannot join to a report")

    def n_headers(self) -> int:
        return self.db.execute("SELECT count(*) FROM facts WHERE header IS NOT NULL").fetchone()[0]

    def headers(self, key: str | None = None) -> list[DicomHeader]:
        """The headers of one study (key), or of every readable file, in walk order."""
        if key is None:
            cur = self.db.execute("SELECT header FROM facts WHERE header IS NOT NULL ORDER BY idx")
        else:
            cur = self.db.execute("SELECT header FROM facts WHERE key = ? AND header IS NOT NULL ORDER BY idx",
                                  (_b(key),))
        return [header_from_json(h) for (h,) in cur]

    # ---- the join
    def collect_keys(self, record_kinds: tuple[str, ...]) -> int:
        """Gather every key of the export (image studies, and the records of `record_kinds` without a
        conflict: labels, reports), sorted, each once; how many."""
        self.db.execute("CREATE INDEX IF NOT EXISTS facts_key ON facts(key)")
        marks = ", ".join("?" * len(record_kinds))
        self.db.execute("CREATE TABLE all_keys AS SELECT key FROM facts WHERE key IS NOT NULL AND header IS "
                        f"NOT NULL UNION SELECT key FROM records WHERE kind IN ({marks}) AND conflicted = 0 "
                        "ORDER BY key", record_kinds)
        return self.db.execute("SELECT count(*) FROM all_keys").fetchone()[0]

    def keys(self, batch: int = 2000) -> Iterator[str]:
        """The keys of :meth:`collect_keys`, in order (in batches: the join writes while it walks them)."""
        last = 0
        while True:
            rows = self.db.execute("SELECT rowid, key FROM all_keys WHERE rowid > ? ORDER BY rowid LIMIT ?",
                                   (last, batch)).fetchall()
            if not rows:
                return
            for last, k in rows:
                yield _s(k)

    def n_image_studies(self) -> int:
        return self.db.execute("SELECT count(DISTINCT key) FROM facts WHERE key IS NOT NULL AND header IS NOT NULL"
                               ).fetchone()[0]

    def add_identifiers(self, pairs) -> None:
        """(kind, value) pairs for the PHI guard's list (a value already listed under its kind is kept once;
        written in batches: :meth:`flush`)."""
        self._ids.extend((kind, _b(v)) for kind, v in pairs)
        if len(self._ids) >= 5000:
            self.flush()

    def identifiers(self, budget: int) -> Iterator[dict[str, list[str]]]:
        """The identifier list in chunks (kind -> sorted values), each of at most `budget` units: a UID costs
        one (the guard keeps it in a set), any other value 16 (its typed variants go into the automaton:
        a birth date has twelve, in two forms each). A guard costs about 45 bytes per unit (71 MiB
        measured for 1.6 million units of IDs, names, birth dates and accession numbers)."""
        self.flush()
        out: dict[str, list[str]] = {}
        used = 0
        for kind, v in self.db.execute("SELECT kind, value FROM identifiers ORDER BY kind, value"):
            cost = 1 if kind.endswith("_uid") else 16
            if used + cost > budget and used:
                yield out
                out, used = {}, 0
            out.setdefault(kind, []).append(_s(v))
            used += cost
        if out:
            yield out

    def write_identifiers(self, path: Path) -> None:
        """``private/identifiers.json`` (kind -> sorted values), written as it is read."""
        self.flush()
        with open(path, "w", encoding="utf-8") as f:
            f.write("{")
            kind_now = None
            for kind, v in self.db.execute("SELECT kind, value FROM identifiers ORDER BY kind, value"):
                if kind != kind_now:
                    f.write(("\n ]," if kind_now is not None else "") + f"\n {json.dumps(kind)}: [")
                    sep, kind_now = "\n  ", kind
                f.write(sep + json.dumps(_s(v)))
                sep = ",\n  "
            f.write("\n ]\n}" if kind_now is not None else "}")

    def add_row(self, key: str, row: dict, patient: str, stratum: str) -> None:
        """A study's row (its report apart), its patient (as the split groups: the raw identifier) and its
        stratum (the split stratifies by it)."""
        report = row.pop("report")
        self.db.execute("INSERT INTO rows VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (self.n_rows, _b(key), json.dumps(row), report, _b(patient), row["patient_id"], stratum))
        self.n_rows += 1

    def reports(self, batch: int = 2000) -> Iterator[tuple[int, str]]:
        for start in range(0, self.n_rows, batch):
            yield from self.db.execute("SELECT seq, report FROM rows WHERE seq >= ? AND seq < ? AND report != '' "
                                       "ORDER BY seq", (start, start + batch)).fetchall()

    def add_hits(self, seq: int, spans: list[tuple[int, int]]) -> None:
        if spans:
            self.db.executemany("INSERT INTO hits VALUES (?, ?, ?)", ((seq, a, b) for a, b in spans))

    def rows(self, batch: int = 2000) -> Iterator[tuple[str, dict, list[tuple[int, int]]]]:
        """(key, row with its report and split, identifier spans in the report) in join order (after
        :meth:`set_splits`)."""
        self.db.execute("CREATE INDEX IF NOT EXISTS hits_seq ON hits(seq)")
        for start in range(0, self.n_rows, batch):
            spans: dict[int, list[tuple[int, int]]] = {}
            for seq, a, b in self.db.execute("SELECT seq, a, b FROM hits WHERE seq >= ? AND seq < ?",
                                             (start, start + batch)):
                spans.setdefault(seq, []).append((a, b))
            for seq, k, row, report, split in self.db.execute(
                    "SELECT seq, key, row, report, split FROM rows JOIN patients USING (patient) "
                    "WHERE seq >= ? AND seq < ? ORDER BY seq", (start, start + batch)).fetchall():
                r = json.loads(row)
                r["report"], r["split"] = report, split
                yield _s(k), r, spans.get(seq, [])

    def shared_pseudonyms(self) -> int:
        """How many pseudonyms stand for more than one study, or for more than one patient."""
        studies = self.db.execute("SELECT count(*) FROM (SELECT 1 FROM rows GROUP BY json_extract(row, '$.study_id') "
                                  "HAVING count(*) > 1)").fetchone()[0]
        patients = self.db.execute("SELECT count(*) FROM (SELECT 1 FROM rows GROUP BY pseudonym "
                                   "HAVING count(DISTINCT patient) > 1)").fetchone()[0]
        return studies + patients

    # ---- the split (see cohort.assign_splits: the same assignment, from these tables)
    def strata_counts(self) -> dict[str, int]:
        """Studies per stratum."""
        return dict(self.db.execute("SELECT stratum, count(*) FROM rows GROUP BY stratum"))

    def patients(self, rank: dict[str, int]) -> list[tuple[str, int]]:
        """Give each patient the stratum of lowest `rank` among its studies' strata; (stratum, patients)
        for each stratum given to a patient, in stratum order."""
        self.db.execute("CREATE TABLE stratum_rank(stratum TEXT PRIMARY KEY, r INTEGER UNIQUE)")
        self.db.executemany("INSERT INTO stratum_rank VALUES (?, ?)", rank.items())
        self.db.execute("CREATE TABLE patients(patient BLOB PRIMARY KEY, stratum TEXT, split TEXT) WITHOUT ROWID")
        self.db.execute("INSERT INTO patients SELECT patient, stratum, NULL FROM (SELECT patient, min(r) AS r FROM "
                        "rows JOIN stratum_rank USING (stratum) GROUP BY patient) JOIN stratum_rank USING (r)")
        self.db.execute("CREATE INDEX patients_stratum ON patients(stratum, patient)")
        return self.db.execute("SELECT stratum, count(*) FROM patients GROUP BY stratum ORDER BY stratum").fetchall()

    def set_splits(self, stratum: str, splits, batch: int = 2000) -> None:
        """The patients of `stratum`, in sorted order, get `splits` (one per patient, in that order)."""
        splits = iter(splits)
        last = b""
        while True:
            rows = self.db.execute("SELECT patient FROM patients WHERE stratum = ? AND patient > ? ORDER BY patient "
                                   "LIMIT ?", (stratum, last, batch)).fetchall()
            if not rows:
                return
            self.db.executemany("UPDATE patients SET split = ? WHERE patient = ?",
                                ((next(splits), p) for (p,) in rows))
            last = rows[-1][0]

    def patient_counts(self) -> tuple[int, dict[str, int]]:
        """Patients (distinct pseudonyms, as cohort.csv names them) in the cohort and in each split."""
        total = self.db.execute("SELECT count(DISTINCT pseudonym) FROM rows").fetchone()[0]
        return total, dict(self.db.execute("SELECT split, count(DISTINCT pseudonym) FROM rows "
                                           "JOIN patients USING (patient) GROUP BY split"))


class StoredRecords:
    """Records of one kind by key in a build store (see :class:`~clinfuse.data.quarantine.KeyedRecords`)."""

    def __init__(self, db: sqlite3.Connection, kind: str, encode: Callable, decode: Callable):
        self.db, self.kind, self.encode, self.decode = db, kind, encode, decode

    def first(self, key: str):
        row = self.db.execute("SELECT value, source, conflicted FROM records WHERE kind = ? AND key = ?",
                              (self.kind, _b(key))).fetchone()
        return None if row is None else (self.decode(row[0]), _s(row[1]), bool(row[2]))

    def put(self, key: str, value, source: str) -> None:
        self.db.execute("INSERT INTO records VALUES (?, ?, ?, ?, 0)", (self.kind, _b(key), self.encode(value), _b(source)))

    def set_conflicted(self, key: str) -> None:
        self.db.execute("UPDATE records SET conflicted = 1 WHERE kind = ? AND key = ?", (self.kind, _b(key)))

    def sources(self) -> "StoredMap":
        return StoredMap(self.db, self.kind, "source", _s, conflicted=True)

    def kept(self) -> "StoredMap":
        return StoredMap(self.db, self.kind, "value", self.decode, conflicted=False)


class StoredMap(Mapping):
    """A read-only mapping over a kind of stored records (key order: sorted, as ``sorted`` on the keys)."""

    def __init__(self, db: sqlite3.Connection, kind: str, column: str, decode: Callable, conflicted: bool):
        self.db, self.kind, self.decode = db, kind, decode
        self._col = column
        self._where = "kind = ?" + ("" if conflicted else " AND conflicted = 0")

    def __getitem__(self, key: str):
        row = self.db.execute(f"SELECT {self._col} FROM records WHERE {self._where} AND key = ?",
                              (self.kind, _b(key))).fetchone()
        if row is None:
            raise KeyError(key)
        return self.decode(row[0])

    def __contains__(self, key) -> bool:
        return isinstance(key, str) and self.db.execute(
            f"SELECT 1 FROM records WHERE {self._where} AND key = ?", (self.kind, _b(key))).fetchone() is not None

    def __iter__(self) -> Iterator[str]:
        last = b""
        while True:  # in batches: no cursor stays open while the caller writes
            rows = self.db.execute(f"SELECT key FROM records WHERE {self._where} AND key > ? ORDER BY key LIMIT 2000",
                                   (self.kind, last)).fetchall()
            if not rows:
                return
            for (last,) in rows:
                yield _s(last)

    def __len__(self) -> int:
        return self.db.execute(f"SELECT count(*) FROM records WHERE {self._where}", (self.kind,)).fetchone()[0]
