"""Explain stage: Captum attributions (image, report words, modality shares), faithfulness, rendering.

Only this package imports captum. It works on a network and a study in the batch contract; the
model object (:class:`clinfuse.Model`) composes it with loading and preprocessing.
"""

from .explanation import EXPLANATION_FORMAT, Explanation, build_explanation, summary_line

__all__ = ["Explanation", "build_explanation", "summary_line", "EXPLANATION_FORMAT"]
