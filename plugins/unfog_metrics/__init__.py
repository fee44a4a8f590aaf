"""First-party metrics; importing this package registers them.

Heavy optional libraries (scikit-learn, scipy, torch-fidelity) are imported only when a metric is built or used.
"""

from unfog_metrics import classifier, digits_classifier, distribution, shapes_checker, tones_spectrum, toy2d_metrics

__all__ = [
    "classifier", "digits_classifier", "distribution", "shapes_checker", "tones_spectrum", "toy2d_metrics",
]
