"""clinfuse: multimodal clinical decision support (DICOM + reports, attention fusion, explanations, MLflow audit).

The public surface is small; each stage lives in its own subpackage (see docs/concepts.md).
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402

__all__ = ["__version__", "Config", "ConfigError", "load_config", "build_cohort", "read_cohort", "read_dicom"]


def __getattr__(name):  # lazy: `import clinfuse` stays light (no pydicom until needed)
    if name in ("build_cohort", "read_cohort"):
        from .data import cohort

        return getattr(cohort, name)
    if name == "read_dicom":
        from .data.dicom import read_dicom

        return read_dicom
    raise AttributeError(f"module 'clinfuse' has no attribute {name!r}")
