"""alignjax.data: preference records -> validated, tokenized, laid-out, process-sharded batches.

Entry point for the trainer::

    data, stats = make_preference_batches("prefs.jsonl", "path/to/tokenizer_dir", layout="packed",
                                          batch_size=64, max_length=512, pack_length=1024, pack_rows=48)
    host_batch = next(data)                    # dict of numpy arrays (see alignjax.data.batching)
    batch = alignjax.sharding.global_batch(mesh, host_batch)
    state = data.get_state(); data.set_state(state)   # exact resume
    stats.summary()                            # rows read/kept/skipped by reason, padding share
"""

from alignjax.data import synthetic
from alignjax.data.batching import (
    LAYOUTS,
    bucket_length,
    first_fit,
    make_batch,
    packed_batch,
    padded_batch,
    padding_fraction,
    shared_prompt_batch,
)
from alignjax.data.pipeline import PreferenceData, make_preference_batches, resolve_tokenizer
from alignjax.data.readers import (
    iter_source,
    load_records,
    read_jsonl,
    read_parquet,
    read_seqio,
    read_tfds,
    register_seqio_task,
)
from alignjax.data.schema import KINDS, DataError, DataStats, split_common_prefix, validate_record
from alignjax.data.tokenize import ChatTokenizer, TokenizedExample, tokenize_record, truncate

__all__ = [
    "KINDS",
    "LAYOUTS",
    "ChatTokenizer",
    "DataError",
    "DataStats",
    "PreferenceData",
    "TokenizedExample",
    "bucket_length",
    "first_fit",
    "iter_source",
    "load_records",
    "make_batch",
    "make_preference_batches",
    "packed_batch",
    "padded_batch",
    "padding_fraction",
    "read_jsonl",
    "read_parquet",
    "read_seqio",
    "read_tfds",
    "register_seqio_task",
    "resolve_tokenizer",
    "shared_prompt_batch",
    "split_common_prefix",
    "synthetic",
    "tokenize_record",
    "truncate",
    "validate_record",
]
