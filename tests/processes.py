"""Conditions a CLI subprocess runs under, set in its preexec_fn: real failures, not mocks."""

from __future__ import annotations

import ctypes
import os
import resource
import signal

_PR_CAPBSET_DROP = 24
_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH = 1, 2


def honour_file_modes() -> None:
    """Make chmod bind this process even as root: drop the capabilities that override file modes
    from the bounding set, so the exec'd program runs without them (a no-op for other users)."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for capability in (_CAP_DAC_OVERRIDE, _CAP_DAC_READ_SEARCH):
        if libc.prctl(_PR_CAPBSET_DROP, capability, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def file_size_limit(max_bytes: int):
    """A preexec_fn under which writing a file past `max_bytes` fails with EFBIG ("File too
    large"), as a full disk fails a write, instead of killing the process with SIGXFSZ."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # an ignored signal stays ignored across exec
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


def make_read_only(*paths) -> None:
    """Every file and directory under `paths` without write permission."""
    for path in paths:
        for root, dirs, files in os.walk(path):
            for name in files:
                os.chmod(os.path.join(root, name), 0o444)
            os.chmod(root, 0o555)
