"""clinfuse: multimodal clinical decision support (DICOM + reports, attention fusion, explanations, MLflow audit).

The few things a user calls, from a notebook or a script (docs/api.md walks through them)::

    import clinfuse
    cohort = clinfuse.build_cohort("export/dicom", "export/reports.csv", "export/labels.csv", "cohort", cfg)
    run = clinfuse.train("cohort", cfg, "runs/first")          # train, calibrate, evaluate, MLflow
    model = clinfuse.Model.load("runs/first")                   # or models:/clinfuse-fusion/1
    model.predict([clinfuse.Study(["a.dcm"], "FINDINGS: ...")]).to_frame()
    model.explain(clinfuse.Study(["a.dcm"], "FINDINGS: ...")).save("explanations/a")
    clinfuse.evaluate(model, "cohort", "test")

Each stage lives in its own subpackage (see docs/concepts.md); importing clinfuse stays light.
"""

__version__ = "0.1.0"

from .config import Config, ConfigError, load_config  # noqa: E402
from .errors import ClinfuseError  # noqa: E402

__all__ = ["__version__", "Config", "ConfigError", "ClinfuseError", "load_config", "build_cohort", "read_cohort",
           "read_dicom", "synthesize", "train", "evaluate", "Model", "Study"]

_LAZY = {
    "build_cohort": ("data.cohort", "build_cohort"),
    "read_cohort": ("data.cohort", "read_cohort"),
    "read_dicom": ("data.dicom", "read_dicom"),
    "synthesize": ("data.synth", "synthesize"),
    "train": ("pipeline", "train_and_audit"),
    "evaluate": ("evaluation.evaluate", "evaluate"),
    "Model": ("inference", "Model"),
    "Study": ("inference", "Study"),
}


def __getattr__(name):  # lazy: `import clinfuse` stays light (no torch, pydicom or mlflow until needed)
    if name in _LAZY:
        import importlib

        mod, attr = _LAZY[name]
        return getattr(importlib.import_module(f".{mod}", __name__), attr)
    raise AttributeError(f"module 'clinfuse' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY))
