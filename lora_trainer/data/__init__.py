"""Dataset folders, captions, aspect-ratio buckets, latent cache and safe image loading.

Names are imported on first use: the tagger and the tag editor read images and captions through this
package and must not pay for importing torch.
"""

from lora_trainer.lazy import lazy_names

_LAZY = {
    "Batch": "lora_trainer.data.loader",
    "BatchPlan": "lora_trainer.data.loader",
    "BucketSettings": "lora_trainer.data.buckets",
    "Bucketer": "lora_trainer.data.buckets",
    "CACHE_FOLDER": "lora_trainer.data.loader",
    "CacheReport": "lora_trainer.data.cache",
    "CaptionOptions": "lora_trainer.data.captions",
    "CaptionText": "lora_trainer.data.caption_files",
    "DatasetIndex": "lora_trainer.data.folders",
    "IMAGE_EXTENSIONS": "lora_trainer.data.images",
    "ImageItem": "lora_trainer.data.folders",
    "ImageSize": "lora_trainer.data.images",
    "LatentCache": "lora_trainer.data.cache",
    "LatentRequest": "lora_trainer.data.cache",
    "Placement": "lora_trainer.data.buckets",
    "TextEncoderCache": "lora_trainer.data.cache",
    "TrainDataset": "lora_trainer.data.loader",
    "part_of": "lora_trainer.data.loader",
    "bucket_info": "lora_trainer.data.buckets",
    "caption_path": "lora_trainer.data.caption_files",
    "count_tags": "lora_trainer.data.folders",
    "file_sha256": "lora_trainer.data.cache",
    "fit_to_bucket": "lora_trainer.data.buckets",
    "has_wildcards": "lora_trainer.data.captions",
    "image_size": "lora_trainer.data.images",
    "image_to_tensor": "lora_trainer.data.images",
    "is_fixed": "lora_trainer.data.captions",
    "is_image_file": "lora_trainer.data.images",
    "join_lines": "lora_trainer.data.caption_files",
    "latent_key": "lora_trainer.data.cache",
    "load_image": "lora_trainer.data.images",
    "make_bucket_resolutions": "lora_trainer.data.buckets",
    "parse_resolution": "lora_trainer.data.buckets",
    "process_caption": "lora_trainer.data.captions",
    "read_caption": "lora_trainer.data.caption_files",
    "request_pixels": "lora_trainer.data.cache",
    "scan_dataset": "lora_trainer.data.folders",
    "to_rgb": "lora_trainer.data.images",
    "verify_image": "lora_trainer.data.images",
}

__all__ = sorted(_LAZY)


__getattr__ = lazy_names(globals(), _LAZY)
