"""MLflow "models from code" entry point: MLflow runs this file to build the pyfunc (no pickling).

Not imported by the package itself; `pipelines.registry.log_model_version` points MLflow at it.
"""

import mlflow

from pipelines.pyfunc import MumicPyfunc

mlflow.models.set_model(MumicPyfunc())
