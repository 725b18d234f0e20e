"""The calibration evaluation's protocol: each compared method's recipe and tuned
settings, the peers' adapters (IVON, laplace-torch). Used by
``scripts/evaluate_calibration.py``; the library itself (``bayes``) never imports it."""
