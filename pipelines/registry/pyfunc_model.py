"""MLflow "models from code" entry point: MLflow runs this file to build the pyfunc (no pickling).

Not imported by the package itself; `pipelines.registry.versions.log_model_version` points MLflow at it.
"""

import mlflow

from pipelines.registry.pyfunc import MumicPyfunc

mlflow.models.set_model(MumicPyfunc())
