"""PHI guard screening speed: MB/s for 1k, 10k and 100k identifiers over 1 MB and 10 MB of text.

Identifiers share prefixes as a hospital's do (accession numbers ``ACC000000001``..., 8-digit MRNs,
names); the text is report-like and full of near misses (``acc00`` tokens that are no accession
number, digit runs around MRN-like values), and holds no identifier, so every screen reads the
whole text. Baseline (the floor, measured on the same text in the same run): one ``str.lower()``
plus one pass of a compiled regex (``[0-9]{5,}``, the cheapest scan that reads every character).
The ratio guard / floor must not grow with the number of identifiers. For scale, the prefix index
that the automaton replaced is timed on 1 MB with 1k and 10k identifiers.

Memory (``--export-files``): the guard of an export of that many DICOM files, each with its own
study, series and SOP instance UID, accession number, patient ID, name and birth date (two studies
per patient), as the cohort builder makes it; resident memory it adds (psutil, a fresh process per
row) against the design before 2026-12-03, measured in the same run: every UID in the Aho-Corasick
automaton, where the guard now looks UIDs up in a set.

Usage: python benchmarks/phi_guard.py [--sizes-mb 1 10] [--ids 1000 10000 100000] [--export-files 2000 20000]
"""

from __future__ import annotations

import argparse
import random
import re
import subprocess
import sys
import time

from clinfuse.phi import _MIN_LEN, PhiGuard

WORDS = ("the lungs are clear no focal consolidation effusion or pneumothorax heart size normal "
         "mild cardiomegaly opacity right lower lobe compared with prior study accession acc00 mrn "
         "dob patient seen on portable ap view impression stable").split()


def identifiers(n: int) -> dict[str, list[str]]:
    third = max(1, n // 3)
    return {"accession": [f"ACC{i:09d}" for i in range(third)],
            "patient_id": [str(44_000_000 + 7 * i) for i in range(third)],
            "patient_name": [f"NAME{i:06d}^GIVEN{i:05d}" for i in range(n - 2 * third)]}


def make_text(mb: float, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, size, target = [], 0, int(mb * 2**20)
    while size < target:
        r = rng.random()
        if r < 0.05:
            w = f"acc00{rng.randrange(10**6):06d}x"  # shares the accession prefix, is not one
        elif r < 0.10:
            w = str(rng.randrange(10**9, 10**12))  # long digit runs: MRN-like values touched by digits
        else:
            w = rng.choice(WORDS)
        parts.append(w)
        size += len(w) + 1
    return " ".join(parts)


def export_identifiers(files: int, seed: int = 0) -> dict[str, list[str]]:
    """The identifiers of an export of `files` DICOM files (one image per study, two studies per patient)."""
    rng = random.Random(seed)
    root = "1.2.826.0.1.3680043.8.498."  # a UID root as pydicom's generate_uid writes it

    def uid() -> str:
        return root + str(rng.randrange(10**29, 10**30)) + "." + str(rng.randrange(10**9))

    ids: dict[str, list[str]] = {k: [] for k in ("study_uid", "series_uid", "sop_uid", "accession",
                                                 "patient_id", "patient_name", "birth_date")}
    for i in range(files):
        for k in ("study_uid", "series_uid", "sop_uid"):
            ids[k].append(uid())
        ids["accession"].append(f"ACC{i:09d}")
        if i % 2 == 0:
            ids["patient_id"].append(str(44_000_000 + 7 * i))
            ids["patient_name"].append(f"FAMILY{i:06d}^GIVEN{i:05d}")
            ids["birth_date"].append(f"19{rng.randrange(30, 99)}{rng.randrange(1, 13):02d}{rng.randrange(1, 29):02d}")
    return ids


def _memory_child(files: int, design: str) -> None:
    """Print the MiB of resident memory that building the guard of an export adds (run in a fresh process)."""
    import gc

    import psutil

    ids = export_identifiers(files)
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    t = time.perf_counter()
    g = PhiGuard(ids) if design == "set" else _guard_before(ids)
    build = time.perf_counter() - t
    gc.collect()
    print(f"{(proc.memory_info().rss - before) / 2**20:.1f} {build:.2f} {len(g[0] if isinstance(g, tuple) else g)}")


def _guard_before(ids: dict[str, list[str]]):
    """What PhiGuard held before 2026-12-03 (kept here only to measure it): every variant, UIDs in their
    dotted form, in one automaton storing an index into the list of identifiers."""
    import ahocorasick

    from clinfuse.phi import _UID_LIKE, _normal, _variants

    kind_of: dict[str, str] = {}
    for kind, values in ids.items():
        for v in values:
            for x in _variants(kind, str(v)):
                for form in ({x.lower()} if _UID_LIKE.fullmatch(x) else {x.lower(), _normal(x)}):
                    if len(form) >= _MIN_LEN:
                        kind_of.setdefault(form, kind)
    idents = list(kind_of)
    a = ahocorasick.Automaton(ahocorasick.STORE_INTS)
    for i, x in enumerate(idents):
        a.add_word(x, i)
    a.make_automaton()
    return kind_of, idents, a


def memory_table(sizes: list[int]) -> None:
    print(f"{'files':>7} {'variants':>9} {'set MiB':>8} {'build s':>8} {'automaton MiB':>14} {'build s':>8} {'ratio':>6}")
    for files in sizes:
        row = {}
        for design in ("set", "automaton"):
            out = subprocess.run([sys.executable, __file__, "--_memory-child", str(files), design],
                                 capture_output=True, text=True, check=True).stdout.split()
            row[design] = (float(out[0]), float(out[1]), int(out[2]))
        (m_set, b_set, n), (m_aut, b_aut, _) = row["set"], row["automaton"]
        print(f"{files:>7} {n:>9} {m_set:>8.1f} {b_set:>8.2f} {m_aut:>14.1f} {b_aut:>8.2f} {m_set / m_aut:>6.2f}")
    print("ratio = guard memory (UIDs in a set) / guard memory (UIDs in the automaton, the design before)")


def floor(text: str) -> float:
    pat = re.compile(r"[0-9]{5,}")
    t = time.perf_counter()
    pat.findall(text.lower())
    return time.perf_counter() - t


def prefix_index_find(guard: PhiGuard, text: str) -> str | None:
    """The matcher before the automaton (kept here only to measure it)."""
    by_prefix: dict[str, list[str]] = {}
    for x in sorted(guard.kind_of, key=len, reverse=True):
        by_prefix.setdefault(x[:_MIN_LEN], []).append(x)
    low = text.lower()
    grams = {low[i: i + _MIN_LEN] for i in range(len(low) - _MIN_LEN + 1)}
    for prefix in grams.intersection(by_prefix):
        for ident in by_prefix[prefix]:
            if ident in low and (not ident.isdigit() or re.search(rf"(?<!\d){ident}(?!\d)", low)):
                return guard.kind_of[ident]
    return None


def best_of(fn, repeat: int = 3) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes-mb", type=float, nargs="+", default=[1, 10])
    ap.add_argument("--ids", type=int, nargs="+", default=[1000, 10000, 100000])
    ap.add_argument("--export-files", type=int, nargs="*", default=[2000, 20000],
                    help="exports (DICOM files) whose guard memory is measured; none to skip")
    ap.add_argument("--_memory-child", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._memory_child:
        _memory_child(int(args._memory_child[0]), args._memory_child[1])
        return
    texts = {mb: make_text(mb) for mb in args.sizes_mb}
    floors = {mb: best_of(lambda: floor(text), repeat=5) for mb, text in texts.items()}
    print(f"{'identifiers':>11} {'variants':>9} {'build s':>8} {'text MB':>8} {'guard s':>8} {'MB/s':>8} "
          f"{'floor s':>8} {'ratio':>6}")
    ratios = {}
    for n in args.ids:
        t = time.perf_counter()
        g = PhiGuard(identifiers(n))
        build = time.perf_counter() - t
        for mb, text in texts.items():
            if g.find(text) is not None:
                raise SystemExit("benchmark text holds an identifier; fix the generator")
            secs = best_of(lambda: g.find(text), repeat=5)
            fl = floors[mb]
            ratios[(n, mb)] = secs / fl
            print(f"{n:>11} {len(g):>9} {build:>8.2f} {mb:>8.0f} {secs:>8.3f} {mb / secs:>8.1f} {fl:>8.3f} "
                  f"{secs / fl:>6.2f}")
    for mb in texts:
        rs = [ratios[(n, mb)] for n in args.ids]
        print(f"ratio guard / floor at {mb:.0f} MB: {' -> '.join(f'{r:.2f}' for r in rs)} "
              f"(from {args.ids[0]} to {args.ids[-1]} identifiers)")
    small = min(texts)
    for n in (1000, 10000):
        g = PhiGuard(identifiers(n))
        secs = best_of(lambda: prefix_index_find(g, texts[small]), repeat=1)
        now = best_of(lambda: g.find(texts[small]))
        print(f"previous prefix index, {n} identifiers, {small:.0f} MB: {secs:.2f} s "
              f"(automaton {now:.3f} s, {secs / now:.0f}x)")
    if args.export_files:
        print()
        memory_table(args.export_files)


if __name__ == "__main__":
    main()
