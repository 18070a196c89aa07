"""The MLflow pyfunc wrapper of a clinfuse model folder (logged as code, never as a pickle).

See the package doc (``clinfuse.serving``) for the request and response.
"""

from __future__ import annotations

import base64
import binascii
import math
from pathlib import Path

import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE
from mlflow.pyfunc import PythonModel

from ..errors import ClinfuseError, StudyInputError

__all__ = ["ClinfusePyfunc", "ENTRY", "model_signature", "input_example", "decode_request", "ServingError"]

ENTRY = Path(__file__).with_name("pyfunc_entry.py")
COLUMNS = ("study_id", "dicom", "report", "variables")


class ServingError(MlflowException):
    """A 400 answer with one line and nothing else.

    MLflow's scoring server rewrites the message of an exception raised in ``predict`` to
    ``"Failed to predict data '<the whole request>' ..."``, which would echo every DICOM byte and
    report back to the client and into logs. The message here is set once and keeps its value.
    """

    def __init__(self, message: str):
        self._fixed = " ".join(str(message).split())
        super().__init__(self._fixed, error_code=INVALID_PARAMETER_VALUE)

    @property
    def message(self) -> str:
        return self._fixed

    @message.setter
    def message(self, value) -> None:  # the server's rewrite is ignored
        pass


def _is_missing(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def _decode_one(v, row: int, k: int) -> bytes:
    if isinstance(v, (bytes, bytearray, memoryview)):
        return bytes(v)
    if isinstance(v, str):
        try:
            return base64.b64decode(v, validate=True)
        except (binascii.Error, ValueError):
            raise StudyInputError(f"row {row + 1}: dicom[{k}] is not base64") from None
    raise StudyInputError(f"row {row + 1}: dicom[{k}] is a {type(v).__name__}; send base64 text or bytes")


def _variables(v, row: int) -> dict | None:
    """A ``variables`` cell: a JSON object as text, or a mapping; missing -> None."""
    import json

    if _is_missing(v) or (isinstance(v, str) and not v.strip()):
        return None
    if isinstance(v, str):
        try:
            v = json.loads(v)
        except json.JSONDecodeError as e:
            raise StudyInputError(f"row {row + 1}: variables is not valid JSON ({e.msg} at character {e.pos})") from None
    if not isinstance(v, dict):
        raise StudyInputError(f"row {row + 1}: variables must be a JSON object (name -> value), not a "
                              f"{type(v).__name__}")
    return v


def decode_request(df: pd.DataFrame) -> list[dict]:
    """The request DataFrame -> one study dict (``study_id``, ``images`` as bytes, ``report``,
    ``variables``) per row.

    Raises:
        StudyInputError: no ``dicom`` and no ``report`` column, or an unknown column.
    """
    if not isinstance(df, pd.DataFrame):
        raise StudyInputError(f"the input must be a table of studies, not {type(df).__name__}")
    unknown = [c for c in df.columns if c not in COLUMNS]
    if unknown:
        raise StudyInputError(f"unknown column(s) {unknown}; the model takes {', '.join(COLUMNS)}")
    if "dicom" not in df.columns and "report" not in df.columns:
        raise StudyInputError("the input needs a 'dicom' column (base64 DICOM files) and/or a 'report' column")
    studies = []
    for i, rec in enumerate(df.to_dict("records")):
        raw = rec.get("dicom")
        if _is_missing(raw) or (isinstance(raw, str) and not raw):
            raw = []
        elif not isinstance(raw, (list, tuple)) and not hasattr(raw, "tolist"):
            raw = [raw]
        raw = list(raw.tolist() if hasattr(raw, "tolist") else raw)
        report = rec.get("report")
        report = None if _is_missing(report) else report
        sid = rec.get("study_id")
        studies.append({"study_id": str(sid) if not _is_missing(sid) else f"row-{i + 1}",
                        "images": [_decode_one(v, i, k) for k, v in enumerate(raw)], "report": report,
                        "variables": _variables(rec.get("variables"), i)})
    return studies


class ClinfusePyfunc(PythonModel):
    """The pyfunc model: :class:`clinfuse.Model` behind MLflow's predict."""

    def load_context(self, context):
        from clinfuse.inference import Model

        self.model = Model.load(context.artifacts["model_dir"])

    def predict(self, context, model_input: pd.DataFrame, params=None) -> pd.DataFrame:
        try:
            studies = decode_request(model_input)
            preds = self.model.predict(studies)
        except ClinfuseError as e:
            raise ServingError(str(e)) from None
        if preds and not any(p.ok for p in preds):
            raise ServingError("; ".join(f"{p.study_id}: {p.reason}" for p in preds)[:2000])
        return preds.to_frame()


def model_signature(output_names: list[str], groups=("image", "report")):
    """The served model's signature: optional dicom (any: a list of base64 DICOM files, one study's
    images), report, variables (a JSON object as text) and study_id columns in; the prediction table
    out (a weight and a p_without column per modality group)."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import AnyType, ColSpec, DataType, Schema

    specs = [ColSpec(DataType.string, "study_id", required=False), ColSpec(AnyType(), "dicom", required=False),
             ColSpec(DataType.string, "report", required=False)]
    if "variables" in groups:
        specs.append(ColSpec(DataType.string, "variables", required=False))
    cols = [ColSpec(DataType.string, "study_id"), ColSpec(DataType.string, "status"), ColSpec(DataType.string, "reason")]
    for n in output_names:
        cols += [ColSpec(DataType.double, f"p_{n}"), ColSpec(DataType.long, f"pred_{n}")]
    cols += [ColSpec(DataType.double, f"w_{m}") for m in groups]
    for m in groups:
        cols += [ColSpec(DataType.double, f"p_{n}_without_{m}") for n in output_names]
    return ModelSignature(inputs=Schema(specs), outputs=Schema(cols))


def input_example() -> pd.DataFrame:
    """A small example request: one report-only study (a real DICOM would make the example megabytes)."""
    return pd.DataFrame({"study_id": ["example"], "dicom": [[]], "report": ["INDICATION: cough. FINDINGS: clear lungs."]})
