"""The site and evaluate stages' code: metrics, calibration, external and site figures, the stress
test, OOD fitting, plots and the model card.
"""
