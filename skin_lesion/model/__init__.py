"""What a registered version ships and runs: the MLflow pyfunc class, its entry file, the saved
network's loading, prediction with embeddings, and OOD scoring.

Nothing here fits anything (fitting lives in training/ and evaluation/): a served model pins only the
packages this folder imports (skin_lesion/registry/model_contents.py).
"""
