"""The skin-lesion pipeline's library: one module per concern; docs/design.md has the map."""

import os

# Before TensorFlow is first imported: its INFO lines (CPU instruction banners and the like) are noise
# in a stage's log; its warnings and errors still show.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
# MLflow's INFO lines (database migrations, "Created version") and its per-download progress bars
# repeat what the stages log themselves; its warnings still show.
os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")

# TensorFlow's two start-up lines per process are the only ones the settings above cannot reach.
from skin_lesion.quiet import quiet_tensorflow_import

quiet_tensorflow_import()
