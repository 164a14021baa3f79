"""The registered model's entry file, logged as MLflow "models from code": it names the pyfunc class.

MLflow runs this file when it loads the model, with skin_lesion/ (logged as the model's code) on the
path; nothing is unpickled, so a registered version does not depend on how a Python object pickles.
"""

import mlflow

from skin_lesion.model.classifier import LesionClassifier

mlflow.models.set_model(LesionClassifier())
