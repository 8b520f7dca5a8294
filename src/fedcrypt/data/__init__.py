"""Datasets, client partitioning and partition summaries for federated simulations."""

from fedcrypt.data.datasets import DATASETS, Dataset, load_dataset, resolve_data_dir
from fedcrypt.data.errors import DatasetError
from fedcrypt.data.idx import read_idx
from fedcrypt.data.partition import PARTITION_METHODS, partition
from fedcrypt.data.summary import ClientSummary, summarize, summary_table

__all__ = [
    "DATASETS",
    "PARTITION_METHODS",
    "ClientSummary",
    "Dataset",
    "DatasetError",
    "load_dataset",
    "partition",
    "read_idx",
    "resolve_data_dir",
    "summarize",
    "summary_table",
]
