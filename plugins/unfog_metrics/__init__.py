"""First-party metrics; importing this package registers them.

Heavy optional libraries (scikit-learn) are imported only when a metric is built.
"""

from unfog_metrics import digits_classifier

__all__ = ["digits_classifier"]
