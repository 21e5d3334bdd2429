"""Test hook of the writer: SIGKILL this process at an exact point of creating or committing.

`SAEFLOW_KILL_AT=<phase>:<n>` kills the writer the n-th time it reaches <phase>, so tests kill a
writer at every point of a commit without relying on timing. Inert when unset.
"""

from __future__ import annotations

import os
import signal

from store.format import StoreError

# Test hook: "<phase>:<n>" SIGKILLs this process the n-th time a commit (or the store's creation)
# reaches <phase>, so tests kill a writer at every point without relying on timing. Inert when unset.
KILL_AT_ENV = "SAEFLOW_KILL_AT"
COMMIT_PHASES = ("commit_started", "acts_written", "data_written", "checksums_written", "stats_written",
                 "arrays_trimmed", "manifest_written")
KILL_PHASES = ("store_created", *COMMIT_PHASES)  # store_created: built, not yet renamed into place


class KillSwitch:
    """The KILL_AT_ENV test hook: SIGKILL at the n-th time a commit reaches the phase."""

    def __init__(self, spec: str | None):
        self.phase, self.at, self.seen = None, 0, 0
        if spec:
            phase, _, n = spec.partition(":")
            if phase not in KILL_PHASES or not n.isdigit():
                raise StoreError(f"{KILL_AT_ENV}={spec!r}: use <phase>:<n>, phase one of {', '.join(KILL_PHASES)}")
            self.phase, self.at = phase, int(n)

    def reached(self, phase: str) -> None:
        if phase == self.phase:
            self.seen += 1
            if self.seen == self.at:
                os.kill(os.getpid(), signal.SIGKILL)
