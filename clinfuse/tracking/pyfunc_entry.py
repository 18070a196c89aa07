"""Models-from-code entry point for MLflow (see clinfuse/tracking/pyfunc.py)."""

from mlflow.models import set_model

from clinfuse.tracking.pyfunc import ClinfusePyfunc

set_model(ClinfusePyfunc())
