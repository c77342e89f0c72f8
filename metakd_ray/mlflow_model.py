"""The MLflow "model from code" of a logged teacher or student (no pickled Python object):
``mlflow.pyfunc.load_model`` runs this file, which names the model class."""

from mlflow.models import set_model

from metakd_ray.deploy import MLflowClassifier

set_model(MLflowClassifier())
