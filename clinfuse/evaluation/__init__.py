"""Evaluation stage: metrics, operating points, calibration, plots, and the evaluate command's logic."""
