"""The data pipeline: Dolma documents -> tokenized memmaps (OLMo's format) -> deterministic global batches.

prepare(...) / python -m megaolmo.data.prepare   Dolma files -> <out>/*.npy + metadata.json + tokenizer.json
  --chat (chat=True)                              instruction JSONL -> the same + <out>/label_masks/*.npy
builtin_corpus()                                  the Python standard library, prepared once and cached
MemmapDataset(paths, seq_len)                     fixed-length instances, OLMo's rule
  label_mask_paths=[...]                          OLMo's np.bool_ label masks, one per token file, in order
GlobalBatches(dataset, global_batch_size, seed)   batch(step) -> Batch: the same rows whatever the layout
  order_dir=<run_dir>/data_order                  each epoch's order memory-mapped from a file, not per rank
  instance_filter=RepetitionFilter(...)           OLMo's repetition filter, as each row's instance_mask
build_order / open_order(order_dir, n, seed, e)   that file: written once (atomically), opened read-only
DataSources(data_config, ...)                     a training run's memmaps and held-out sources, checked
"""

import warnings

# `python -m megaolmo.data.prepare` runs a module this package has already imported (to re-export prepare());
# runpy warns about that. It is harmless: the CLI hands over to the imported module (see prepare.py's end).
warnings.filterwarnings("ignore", message="'megaolmo.data.prepare' found in sys.modules", category=RuntimeWarning)

from megaolmo.data.batch import Batch
from megaolmo.data.corpus import BuiltinCorpus, builtin_corpus
from megaolmo.data.dataset import GlobalBatches, MemmapDataset, check_compatible, global_order
from megaolmo.data.dolma import iter_documents
from megaolmo.data.filter import RepetitionFilter
from megaolmo.data.labels import IGNORE_INDEX, shifted_labels
from megaolmo.data.metadata import read_metadata, token_dtype
from megaolmo.data.order import build_order, open_order
from megaolmo.data.prepare import prepare
from megaolmo.data.sources import DataSources
from megaolmo.data.tokenizer import eos_id, load_tokenizer, tokenizer_fingerprint, train_bpe_tokenizer
from megaolmo.errors import DataError

__all__ = [
    "IGNORE_INDEX",
    "Batch",
    "BuiltinCorpus",
    "DataError",
    "DataSources",
    "GlobalBatches",
    "MemmapDataset",
    "RepetitionFilter",
    "build_order",
    "builtin_corpus",
    "check_compatible",
    "eos_id",
    "global_order",
    "iter_documents",
    "load_tokenizer",
    "open_order",
    "prepare",
    "read_metadata",
    "shifted_labels",
    "token_dtype",
    "tokenizer_fingerprint",
    "train_bpe_tokenizer",
]
