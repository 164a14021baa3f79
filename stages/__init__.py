"""The DVC stages, one script each; `python -m stages.<name>` runs one as dvc.yaml does."""

import skin_lesion  # noqa: F401  (first: it sets up the environment before TensorFlow is imported)
