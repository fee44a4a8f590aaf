"""First-party conditioners; importing this package registers them."""

from unfog_conditioners import auto, class_label, image_concat, scalar, text, text_pretrained

__all__ = ["auto", "class_label", "image_concat", "scalar", "text", "text_pretrained"]
