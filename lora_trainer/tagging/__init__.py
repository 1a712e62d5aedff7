"""Tagging: caption files (atomic writes with backup), the tag editor with undo, dataset analysis, WD14 tagger."""
from lora_trainer.tagging.analysis import (
    Association,
    CaptionRecord,
    ConceptBalance,
    ConceptRow,
    DatasetReport,
    TagCount,
    UniversalTag,
    analyze,
    associations,
    concept_balance,
    near_universal_tags,
    tag_frequency,
)
from lora_trainer.tagging.caption_store import WriteInfo, backup_path, restore_backup, write_caption, write_caption_bytes
from lora_trainer.tagging.editor import CaptionPreview, EditResult, TagEditor
from lora_trainer.tagging.editor_io import FolderInfo, ImageEntry
from lora_trainer.tagging.editor_store import Conflict, ReloadResult, SaveFailure, SaveResult

__all__ = [
    "Association",
    "CaptionPreview",
    "CaptionRecord",
    "ConceptBalance",
    "ConceptRow",
    "Conflict",
    "DatasetReport",
    "EditResult",
    "FolderInfo",
    "ImageEntry",
    "ReloadResult",
    "SaveFailure",
    "SaveResult",
    "TagCount",
    "TagEditor",
    "UniversalTag",
    "WriteInfo",
    "analyze",
    "associations",
    "backup_path",
    "concept_balance",
    "near_universal_tags",
    "restore_backup",
    "tag_frequency",
    "write_caption",
    "write_caption_bytes",
]
