"""Data: the sample schema, the validating JSONL reader and synthetic tasks."""

from vlreason.data.jsonl import DataError, DataFile, DataProblem, OnBadSample, check_jsonl, read_jsonl
from vlreason.data.schema import Message, Sample

__all__ = ["DataError", "DataFile", "DataProblem", "Message", "OnBadSample", "Sample", "check_jsonl", "read_jsonl"]
