"""First-party metrics; importing this package registers them.

Heavy optional libraries (scikit-learn, scipy) are imported only when a metric is built or used.
"""

from unfog_metrics import digits_classifier, shapes_checker, tones_spectrum

__all__ = ["digits_classifier", "shapes_checker", "tones_spectrum"]
