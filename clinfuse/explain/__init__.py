"""Explain stage: Captum attributions (image, report words, modality shares), faithfulness, rendering.

Only this package imports captum.
"""
