"""Serving stage: the clinfuse model as an MLflow pyfunc that takes what a hospital has.

Input (JSON ``dataframe_records`` or ``dataframe_split``, or a DataFrame in Python), one row per study:

- ``dicom``: the study's DICOM files: a list of base64 strings (JSON) or of bytes (DataFrame), or one
  such value; empty or absent for a report-only study; a model with several image slots reads the
  views the cohort builder would choose (frontal first);
- ``report``: the report's raw text (absent, null or "" for an image-only study);
- ``variables``: for a model that reads structured variables, a JSON object as text (``{"crp": 42,
  "sex": "F"}``); a missing name is a missing value, an unknown one an error for that study;
- ``study_id``: optional, echoed back.

Preprocessing (DICOM decode, VOI, scaling, resizing, view choice, report sections, tokenising)
happens inside the served model, through :class:`clinfuse.Model`, exactly as for ``Model.predict``.
Output: one row per study as ``Predictions.to_frame()``: ``study_id``, ``status``, ``reason``,
``p_<output>``, ``pred_<output>``, ``w_image``, ``w_report`` (``w_variables``), ``p_<output>_without_<modality>``.
A request in which no study can be read is answered 400 with a one-line reason (no stack trace); in
a request with readable studies, an unreadable one has ``status`` 'error' and its reason.

Only this stage and ``clinfuse.tracking`` import mlflow.
"""

from .pyfunc import ENTRY, ClinfusePyfunc, decode_request, input_example, model_signature

__all__ = ["ClinfusePyfunc", "ENTRY", "model_signature", "input_example", "decode_request"]
