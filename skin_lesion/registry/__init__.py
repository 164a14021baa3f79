"""Logging a version to MLflow and registering it, with the code and requirements it ships."""
