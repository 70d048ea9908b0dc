"""Calibration and evaluation text (local files or the hub)."""

from .calibration import (DATASETS, DataError, TextSource, calibration_windows, eval_windows, file_source,
                          load_source, local_files, read_text_file, token_ids, tokenize_text)

__all__ = ["DATASETS", "DataError", "TextSource", "calibration_windows", "eval_windows", "file_source",
           "load_source", "local_files", "read_text_file", "token_ids", "tokenize_text"]
