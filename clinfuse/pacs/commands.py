"""``clinfuse pacs pull | run | listen``: the argument parsers and thin handlers (the work is in this package)."""

from __future__ import annotations

import sys

from .client import ENV_CA_BUNDLE, ENV_PASSWORD, ENV_TOKEN, ENV_USER

_CREDS = (f"Credentials come from the environment: {ENV_USER} and {ENV_PASSWORD} (HTTP basic), or {ENV_TOKEN} "
          f"(bearer); never from the URL. TLS: --ca-bundle or {ENV_CA_BUNDLE}. See docs/pacs.md.")


def add_parsers(sub, formatter, epilog: str) -> None:
    """Add ``pacs`` and its subcommands to the ``clinfuse`` parser's subparsers."""
    pacs = sub.add_parser("pacs", help="pull from a PACS; predict and file SR + heatmap back",
                          description="The hospital loop over DICOMweb and DICOM networking. " + _CREDS,
                          epilog=epilog, formatter_class=formatter)
    ps = pacs.add_subparsers(dest="pacs_command", metavar="<subcommand>", required=True)
    pacs.formatter_class = formatter

    def url(p, required=True):
        p.add_argument("--url", metavar="URL", required=required,
                       help="DICOMweb base URL of the PACS, e.g. http://127.0.0.1:8042/dicom-web (Orthanc)")
        p.add_argument("--ca-bundle", metavar="PEM", help=f"CA certificate(s) of the PACS's TLS (default {ENV_CA_BUNDLE})")

    p = ps.add_parser("pull", help="retrieve studies into an export folder for `cohort build`",
                      description="Search (QIDO-RS) and retrieve (WADO-RS) studies into OUT/<study>/<series>/<sop>.dcm, "
                      "as the PACS stores them. Every study is looked up before anything is written; instances "
                      "already on disk are skipped, so a pull killed and rerun ends with the same files. " + _CREDS,
                      epilog=epilog)
    url(p)
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--study", metavar="UID", nargs="+", help="StudyInstanceUID(s) to pull")
    which.add_argument("--since", metavar="DATE", help="every study on or after DATE (YYYY-MM-DD)")
    p.add_argument("--modality", metavar="CR,DX,...", help="only these modalities (comma-separated)")
    p.add_argument("--out", metavar="DIR", required=True, help="export folder (created; reused to resume)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    r = ps.add_parser("run", help="predict studies; store SR + heatmap into each (STOW-RS)",
                      description="Retrieve each study, predict and explain it with the model, and store a DICOM "
                      "Structured Report (probabilities, decisions and operating points, modality shares, p_without, "
                      "faithfulness, model name/version/URI) and the heatmap as a Secondary Capture into the same "
                      "study as new series; a FHIR DiagnosticReport per study goes to --out (and --fhir-url). An "
                      "instance that does not decode, a study without a report, a refused store: each is reported "
                      "and the rest goes on (exit status 1 when any study got no result or its results did not arrive). "
                      "--out holds the patient-identifying results (like the PACS); the console and MLflow name "
                      "studies by pseudonyms only. " + _CREDS, epilog=epilog)
    r.add_argument("--model", metavar="REF", required=True,
                   help="model folder, training run folder, or MLflow URI (models:/NAME/VERSION, models:/NAME@ALIAS)")
    url(r)
    r.add_argument("--study", metavar="UID", nargs="+", required=True, help="StudyInstanceUID(s) to predict")
    r.add_argument("--reports", metavar="FILE",
                   help="reports CSV/JSON lines with a StudyInstanceUID or AccessionNumber column (as `cohort build` "
                   "takes); default: a text SR stored in the study, else image only")
    r.add_argument("--out", metavar="DIR", required=True, help="local copies (SR, SC, FHIR), results.csv, private/")
    r.add_argument("--fhir-url", metavar="URL", help="also POST each DiagnosticReport to this FHIR server "
                   "(bearer token from CLINFUSE_FHIR_TOKEN)")
    r.add_argument("--no-store", action="store_true", help="keep the results local; store nothing in the PACS")
    r.add_argument("--no-explain", action="store_true", help="predict only: no heatmap, no faithfulness in the SR")
    r.add_argument("--tracking-uri", metavar="URI", help="MLflow store of the audit run (and of a models:/ URI)")
    r.add_argument("--no-mlflow", action="store_true", help="do not record the run in MLflow")
    r.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    li = ps.add_parser("listen", help="storage SCP: predict pushed studies, send results back",
                       description="Receive studies by C-STORE (a modality or the PACS pushes them), predict each when "
                       "no instance has arrived for --quiet seconds, and send the SR and heatmap SC to --send-to "
                       "(C-STORE) or to --url (STOW-RS). Ctrl-C predicts what was received and stops. " + _CREDS,
                       epilog=epilog)
    li.add_argument("--model", metavar="REF", required=True, help="model folder, run folder or MLflow URI")
    li.add_argument("--port", type=int, required=True, help="DICOM port to listen on")
    li.add_argument("--host", default="127.0.0.1", help="address (default 127.0.0.1; 0.0.0.0 for the network)")
    li.add_argument("--aet", default="CLINFUSE", help="our AE title (default CLINFUSE)")
    li.add_argument("--quiet", type=float, default=10.0, metavar="S",
                    help="seconds without a new instance after which a study is complete (default 10)")
    li.add_argument("--send-to", metavar="AET@HOST:PORT", help="send results by C-STORE to this DICOM node")
    url(li, required=False)
    li.add_argument("--reports", metavar="FILE", help="reports file as for `pacs run`")
    li.add_argument("--out", metavar="DIR", required=True, help="local copies, results.csv, private/")
    li.add_argument("--tracking-uri", metavar="URI", help="MLflow store for a models:/ URI")
    li.add_argument("--no-explain", action="store_true", help="predict only")


def _client(args):
    from .client import PacsClient

    return PacsClient(args.url, ca_bundle=args.ca_bundle)


def pull_cmd(args) -> int:
    from .pull import pull

    mods = [m.strip().upper() for m in args.modality.split(",") if m.strip()] if args.modality else None
    res = pull(_client(args), args.out, studies=args.study, since=args.since, modalities=mods,
               progress=not args.no_progress)
    print(res.line())
    print(f"export in {args.out}; next: clinfuse cohort build --dicom {args.out} --reports REPORTS --labels LABELS "
          "--out COHORT_DIR")
    return 0


def run_cmd(args) -> int:
    from ..inference import Model
    from .run import run_studies

    client = _client(args)
    client.check()  # before the model loads: a wrong password is one line, at once
    model = Model.load(args.model, tracking_uri=args.tracking_uri)
    s = run_studies(model, client, args.study, args.out, reports=args.reports, explain=not args.no_explain,
                    store=not args.no_store, fhir_url=args.fhir_url, tracking_uri=args.tracking_uri,
                    track=not args.no_mlflow, progress=not args.no_progress, log=lambda m: print(m, flush=True))
    print(s.line())
    print(f"results.csv, the SR/SC/FHIR copies and private/ (pseudonym -> StudyInstanceUID) in {args.out}")
    c = s.counts()
    return 0 if c["failed"] == 0 and c["store_failed"] == 0 and c["fhir_failed"] == 0 else 1


def listen_cmd(args) -> int:
    from ..errors import ClinfuseError
    from ..inference import Model
    from .listen import DicomNode, StudyListener

    if args.send_to and args.url:
        raise ClinfuseError("give --send-to (C-STORE) or --url (STOW-RS), not both")
    if not args.send_to and not args.url:
        print("clinfuse pacs listen: note: neither --send-to nor --url given; results stay in --out", file=sys.stderr)
    node = DicomNode.parse(args.send_to) if args.send_to else None
    client = _client(args) if args.url else None
    if client is not None:
        client.check()
    model = Model.load(args.model, tracking_uri=args.tracking_uri)
    try:
        StudyListener(model, args.out, port=args.port, aet=args.aet, host=args.host, quiet=args.quiet, send_to=node,
                      client=client, reports=args.reports, explain=not args.no_explain,
                      log=lambda m: print(m, flush=True)).serve_forever()
    except OSError as e:
        raise ClinfuseError(f"cannot listen on {args.host}:{args.port}: {e.strerror or e}") from None
    return 0


HANDLERS = {"pull": pull_cmd, "run": run_cmd, "listen": listen_cmd}
__all__ = ["add_parsers", "HANDLERS"]
