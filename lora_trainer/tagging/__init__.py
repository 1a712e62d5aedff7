"""Tagging: caption files (atomic writes with backup), the tag editor with undo, dataset analysis, WD14 tagger."""

from lora_trainer.lazy import lazy_names
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
from lora_trainer.tagging.caption_journal import CaptionJournal, JournalFile, JournalRun, journal_path
from lora_trainer.tagging.caption_store import (
    WriteInfo,
    backup_path,
    restore_backup,
    write_caption,
    write_caption_bytes,
)
from lora_trainer.tagging.editor import CaptionPreview, EditResult, TagEditor
from lora_trainer.tagging.editor_io import FolderInfo, ImageEntry
from lora_trainer.tagging.editor_store import Conflict, ReloadResult, SaveFailure, SaveResult
from lora_trainer.tagging.journaled_writes import (
    CaptionChange,
    JournaledWriter,
    RestoreReport,
    WriteReport,
    complete_last_run,
    undo_last_run,
)

# The WD14 tagger pulls in PIL and onnxruntime: imported on first use of one of its names.
_LAZY = {
    "TaggerModel": "lora_trainer.tagging.tagger",
    "TagSummary": "lora_trainer.tagging.tagger",
    "tag_folder": "lora_trainer.tagging.tagger",
    "TagOptions": "lora_trainer.tagging.tag_format",
    "ModelInfo": "lora_trainer.tagging.tagger_models",
    "find_models": "lora_trainer.tagging.tagger_models",
    "model_info": "lora_trainer.tagging.tagger_models",
    "download_model": "lora_trainer.tagging.tagger_models",
}


__getattr__ = lazy_names(globals(), _LAZY)


__all__ = [
    "Association",
    "CaptionChange",
    "CaptionJournal",
    "CaptionPreview",
    "CaptionRecord",
    "ConceptBalance",
    "ConceptRow",
    "Conflict",
    "DatasetReport",
    "EditResult",
    "FolderInfo",
    "ImageEntry",
    "JournalFile",
    "JournalRun",
    "JournaledWriter",
    "ModelInfo",
    "ReloadResult",
    "RestoreReport",
    "SaveFailure",
    "SaveResult",
    "TagCount",
    "TagEditor",
    "TagOptions",
    "TagSummary",
    "TaggerModel",
    "UniversalTag",
    "WriteInfo",
    "WriteReport",
    "analyze",
    "associations",
    "backup_path",
    "complete_last_run",
    "concept_balance",
    "download_model",
    "find_models",
    "journal_path",
    "model_info",
    "near_universal_tags",
    "restore_backup",
    "tag_folder",
    "tag_frequency",
    "undo_last_run",
    "write_caption",
    "write_caption_bytes",
]
