"""``clinfuse pacs listen``: a DICOM storage SCP that predicts each study pushed to it.

A modality or the PACS sends a study by C-STORE (``pynetdicom``). Instances are gathered per
StudyInstanceUID; when no instance of a study has arrived for ``quiet`` seconds the study is taken
as complete, predicted and explained with the model object, and its SR and heatmap Secondary
Capture are sent to the destination: a DICOM node by C-STORE (``--send-to AET@HOST:PORT``) or a
DICOMweb PACS by STOW-RS (``--url``). Local copies and the FHIR report go under ``--out`` as with
``pacs run``; instances made by clinfuse itself are ignored, so results sent back never loop.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import ClinfuseError
from .client import PacsError
from .results import ModelIdentity
from .run import Pseudonyms, RunSummary, StudyResult, _line, _write_results, deliver, predict_or_fail, report_for

__all__ = ["StudyListener", "DicomNode", "send_cstore"]


@dataclass(frozen=True)
class DicomNode:
    """A DICOM network peer: AE title, host, port (``AET@HOST:PORT``)."""

    aet: str
    host: str
    port: int

    @classmethod
    def parse(cls, s: str) -> "DicomNode":
        try:
            aet, rest = s.split("@", 1)
            host, port = rest.rsplit(":", 1)
            node = cls(aet, host, int(port))
        except ValueError:
            raise ClinfuseError(f"{s!r}: give a DICOM node as AET@HOST:PORT, e.g. ORTHANC@127.0.0.1:4242") from None
        if not 0 < len(aet) <= 16:
            raise ClinfuseError(f"{s!r}: an AE title has 1 to 16 characters")
        return node


def send_cstore(datasets: list, node: DicomNode, calling_aet: str = "CLINFUSE") -> None:
    """C-STORE `datasets` to `node`; raises :class:`PacsError` naming what failed."""
    from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
    from pynetdicom import AE

    ae = AE(ae_title=calling_aet)
    for uid in sorted({str(d.SOPClassUID) for d in datasets}):
        ae.add_requested_context(uid, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(node.host, node.port, ae_title=node.aet)
    if not assoc.is_established:
        raise PacsError(f"{node.aet}@{node.host}:{node.port}: association refused or node unreachable")
    try:
        for ds in datasets:
            status = assoc.send_c_store(ds)
            code = getattr(status, "Status", None)
            if code is None or code not in (0x0000, 0xB000, 0xB007, 0xB006):
                raise PacsError(f"{node.aet}@{node.host}:{node.port}: C-STORE of a {ds.Modality} instance failed "
                                f"(status {'none' if code is None else hex(code)})")
    finally:
        assoc.release()


class StudyListener:
    """A storage SCP that predicts studies when they are complete (see the module doc).

    Args:
        model: a loaded :class:`clinfuse.inference.Model`.
        out: folder for local copies, ``results.csv`` and ``private/`` (pseudonym key and table).
        port, aet: where it listens (127.0.0.1 by default; ``host='0.0.0.0'`` to accept the network).
        quiet: seconds without a new instance after which a study counts as complete.
        send_to: a :class:`DicomNode` for C-STORE, or `client` (a :class:`PacsClient`) for STOW-RS.
        reports: a reports file as for ``pacs run`` (else a text SR in the study is the report).
    """

    def __init__(self, model, out, *, port: int, aet: str = "CLINFUSE", host: str = "127.0.0.1", quiet: float = 10.0,
                 send_to: DicomNode | None = None, client=None, reports=None, explain: bool = True, log=print):
        from pathlib import Path

        from .run import load_report_table

        self.model, self.identity = model, ModelIdentity(model)
        self.out = Path(out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.pseud = Pseudonyms(self.out / "private")
        self.port, self.aet, self.host, self.quiet = port, aet, host, quiet
        self.send_to, self.client, self.explain, self.log = send_to, client, explain, log
        self.table = load_report_table(reports, model.config.cohort.reports) if reports else {}
        self.pending: dict[str, list] = {}
        self.last: dict[str, float] = {}
        self.results: list[StudyResult] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._server = None
        self._worker = None
        self._t0 = time.monotonic()

    # ------------------------------------------------------------------ C-STORE handler
    def _on_store(self, event):
        try:
            ds = event.dataset
            ds.file_meta = event.file_meta
        except Exception:  # noqa: BLE001 - a dataset pynetdicom cannot decode: refuse this one instance
            return 0xC210  # cannot understand
        if str(getattr(ds, "Manufacturer", "")) == "clinfuse":
            return 0x0000  # our own results coming back: accepted, not predicted
        uid = str(getattr(ds, "StudyInstanceUID", "") or "")
        if not uid:
            return 0xA900  # dataset does not match SOP class: no study to file it in
        with self._lock:
            self.pending.setdefault(uid, []).append(ds)
            self.last[uid] = time.monotonic()
        return 0x0000

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "StudyListener":
        from pynetdicom import AE, AllStoragePresentationContexts, evt
        from pynetdicom.sop_class import Verification
        from pydicom.uid import AllTransferSyntaxes

        ae = AE(ae_title=self.aet)
        for cx in AllStoragePresentationContexts:
            ae.add_supported_context(cx.abstract_syntax, AllTransferSyntaxes)
        ae.add_supported_context(Verification)
        ae.maximum_pdu_size = 0
        self._ae = ae
        self._server = ae.start_server((self.host, self.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        self._worker = threading.Thread(target=self._loop, name="clinfuse-listen", daemon=True)
        self._worker.start()
        self.log(f"listening as {self.aet} on {self.host}:{self.port}; a study is predicted {self.quiet:g} s after "
                 "its last instance")
        return self

    def _loop(self) -> None:
        while not self._stop.is_set():
            self.process_ready()
            self._stop.wait(0.2)
        self.process_ready(force=True)

    def process_ready(self, force: bool = False) -> int:
        """Predict every study that has been quiet long enough (all of them with `force`)."""
        now = time.monotonic()
        with self._lock:
            ready = [u for u, t in self.last.items() if force or now - t >= self.quiet]
            batches = [(u, self.pending.pop(u)) for u in ready]
            for u in ready:
                self.last.pop(u)
        for uid, datasets in batches:
            self._process(uid, datasets)
        return len(batches)

    def _process(self, uid: str, datasets: list) -> None:
        ps = self.pseud.assign(uid)
        res, new, fhir = predict_or_fail(self.model, self.identity, datasets, report_for(self.table, uid, datasets),
                                         ps, explain=self.explain)
        if self.send_to is not None:
            send = lambda dss: send_cstore(dss, self.send_to, self.aet)  # noqa: E731
        elif self.client is not None:
            send = lambda dss: self.client.store(dss, uid)  # noqa: E731
        else:
            send = None
        deliver(res, new, fhir, self.out, send, log=self.log, hide=[uid],
                verify=getattr(self.client, "verify", True))
        self.results.append(res)
        self.log(_line(res, self.model.output_names))

    def stop(self) -> None:
        """Stop listening, predict what was received, write ``results.csv`` and ``run.json``."""
        self._stop.set()
        if self._worker is not None:
            self._worker.join(timeout=600)
        if self._server is not None:
            self._server.shutdown()
        _write_results(self.out, RunSummary(self.results, self.out, time.monotonic() - self._t0),
                       self.model.output_names)

    def serve_forever(self) -> None:
        """Block until Ctrl-C (then finish the studies received, and stop)."""
        self.start()
        try:
            while True:
                time.sleep(1)
        except KeyboardInterrupt:
            self.log("stopping: predicting the studies already received")
        finally:
            self.stop()

    def __enter__(self) -> "StudyListener":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
