"""First-party datasets; importing this package registers them.

Heavy optional libraries (torchvision, scikit-learn, PIL) are imported only when a dataset
is built, so discovering plugins stays fast.
"""

from unfog_datasets import digits, image_folder, shapes, torchvision_sets, toy2d

__all__ = ["digits", "image_folder", "shapes", "toy2d", "torchvision_sets"]
