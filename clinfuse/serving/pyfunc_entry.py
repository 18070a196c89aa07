"""Models-from-code entry point for MLflow (see clinfuse/serving/pyfunc.py)."""

from mlflow.models import set_model

from clinfuse.serving.pyfunc import ClinfusePyfunc

set_model(ClinfusePyfunc())
