"""Stages of the skin-lesion pipeline, one module each, wired together by dvc.yaml."""
