"""The tokenizer a store carries in `<store>/tokenizer/` (its own files, saved by generate), so that
a copied store decodes its `tokens` on any machine, without the model it was made with."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from store.format import StoreError
from store.location import StoreLocation, locate

TOKENIZER_DIR = "tokenizer"
TOKENIZER_FILE = "tokenizer.json"  # written last: its presence means the folder is whole


def load_store_tokenizer(path: str | Path | StoreLocation) -> Any:
    """The store's own tokenizer (a `tokenizers.Tokenizer`: decode(ids) gives the text of rows)."""
    from tokenizers import Tokenizer

    location = locate(path)
    key = f"{TOKENIZER_DIR}/{TOKENIZER_FILE}"
    if location.local is not None:
        file = location.local / key
        data = file.read_bytes() if file.is_file() else None
    else:
        data = location.read(key)
    if data is None:
        raise StoreError(f"{location}/{key} does not exist: the store was written without its tokenizer; regenerate it")
    return Tokenizer.from_str(data.decode())
