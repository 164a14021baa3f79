"""What people run by hand: the command line, predict, serving, the review page, feedback, monitoring.

No DVC stage imports this package, so editing it never makes a stage stale (tests/test_dvc_yaml.py).
"""
