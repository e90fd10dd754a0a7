"""The registered MLflow model, logged from code: `mlflow.pyfunc.load_model` runs this file to get the model
object (nothing is pickled). The model's code_paths carry umo's sources, so it loads where umo is not installed."""

from mlflow.models import set_model

from umo.serve import UmoLoraModel

set_model(UmoLoraModel())
