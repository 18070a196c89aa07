"""Data stage: DICOM reading, report text, labels, cohort building, synthetic exports. Imports no model code."""
