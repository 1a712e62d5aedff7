"""Dataset folders, captions, aspect-ratio buckets, latent cache and safe image loading."""
from lora_trainer.data.caption_files import CaptionText, caption_path, read_caption
from lora_trainer.data.captions import CaptionOptions, has_wildcards, is_fixed, process_caption
from lora_trainer.data.images import IMAGE_EXTENSIONS, ImageSize, image_size, is_image_file, load_image, to_rgb

__all__ = [
    "CaptionOptions",
    "CaptionText",
    "IMAGE_EXTENSIONS",
    "ImageSize",
    "caption_path",
    "has_wildcards",
    "image_size",
    "is_fixed",
    "is_image_file",
    "load_image",
    "process_caption",
    "read_caption",
    "to_rgb",
]
