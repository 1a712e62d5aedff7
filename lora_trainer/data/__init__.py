"""Dataset folders, captions, aspect-ratio buckets, latent cache and safe image loading."""
from lora_trainer.data.buckets import (
    Bucketer,
    BucketSettings,
    Placement,
    bucket_info,
    fit_to_bucket,
    make_bucket_resolutions,
    parse_resolution,
)
from lora_trainer.data.cache import (
    CacheReport,
    LatentCache,
    LatentRequest,
    TextEncoderCache,
    file_sha256,
    latent_key,
    request_pixels,
)
from lora_trainer.data.caption_files import CaptionText, caption_path, join_lines, read_caption
from lora_trainer.data.captions import CaptionOptions, has_wildcards, is_fixed, process_caption
from lora_trainer.data.folders import DatasetIndex, ImageItem, count_tags, scan_dataset
from lora_trainer.data.images import (
    IMAGE_EXTENSIONS,
    ImageSize,
    image_size,
    image_to_tensor,
    is_image_file,
    load_image,
    to_rgb,
    verify_image,
)
from lora_trainer.data.loader import CACHE_FOLDER, Batch, BatchPlan, TrainDataset

__all__ = [
    "Batch",
    "BatchPlan",
    "Bucketer",
    "BucketSettings",
    "CACHE_FOLDER",
    "CacheReport",
    "CaptionOptions",
    "CaptionText",
    "DatasetIndex",
    "IMAGE_EXTENSIONS",
    "ImageItem",
    "ImageSize",
    "LatentCache",
    "LatentRequest",
    "Placement",
    "TextEncoderCache",
    "TrainDataset",
    "bucket_info",
    "caption_path",
    "count_tags",
    "file_sha256",
    "fit_to_bucket",
    "has_wildcards",
    "image_size",
    "image_to_tensor",
    "is_fixed",
    "is_image_file",
    "join_lines",
    "latent_key",
    "load_image",
    "make_bucket_resolutions",
    "parse_resolution",
    "process_caption",
    "read_caption",
    "request_pixels",
    "scan_dataset",
    "to_rgb",
    "verify_image",
]
