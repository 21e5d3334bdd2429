"""The store layer's errors: each one line that names the problem and the fix."""

from __future__ import annotations


class StoreError(RuntimeError):
    """A store problem, phrased as one line that names the problem and the fix."""


class ChunkError(StoreError):
    """One chunk of a store is damaged: missing, truncated, grown, undecodable or not matching
    its recorded checksum."""

    def __init__(self, store: object, array_path: str, index: int, reason: str):
        self.array_path, self.index, self.reason = array_path, index, reason
        super().__init__(
            f"store {store}: {array_path} chunk {index} {reason}; run `saeflow validate {store}`, "
            "then regenerate the store or restore it from a copy"
        )
