"""Where versions registered before the model/ folder existed find their pyfunc class.

Their entry file says `from skin_lesion.serving import LesionClassifier`. Loaded where this package is
already imported (`skin-lesion predict`, `serve`, `review`), that name resolves here rather than in the
code the version shipped; `mlflow models serve` runs the version's own copy. No stage imports this.
"""

from skin_lesion.model.classifier import LesionClassifier

__all__ = ["LesionClassifier"]
