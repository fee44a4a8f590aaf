"""First-party datasets; importing this package registers them.

Heavy optional libraries (torchvision, scikit-learn, PIL) are imported only when a dataset
is built, so discovering plugins stays fast.
"""

from unfog_datasets import audio_folder, digits, image_folder, shapes, tones, torchvision_sets, toy2d

__all__ = ["audio_folder", "digits", "image_folder", "shapes", "tones", "toy2d", "torchvision_sets"]
