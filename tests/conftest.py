"""Test-wide settings: one torch thread (tests are small; on 2 shared cores a second intra-op
thread mostly spins against the loader's and writer's threads) and no hub access."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONFAULTHANDLER", "1")  # a CLI subprocess killed by a signal shows its threads' stacks

import torch  # noqa: E402

torch.set_num_threads(1)


import pytest  # noqa: E402

from tests.s3_server import start_s3_server, stop_s3_server  # noqa: E402


@pytest.fixture(scope="session")
def s3(tmp_path_factory):
    """A SeaweedFS S3 server for the session; its credentials and endpoint are in os.environ
    (so CLI subprocesses inherit them) while it runs."""
    server = start_s3_server(tmp_path_factory.mktemp("s3"))
    saved = {key: os.environ.get(key) for key in server.env}
    os.environ.update(server.env)
    try:
        yield server
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        stop_s3_server(server)


# The longest files, started first: under xdist (pyproject's addopts) a file runs on one worker,
# and one of these started last would run on alone at the end.
SLOW_FILES = ("tests/test_dvc.py", "tests/test_remote_store.py", "tests/generate/test_ranks.py",
              "tests/train/test_distributed.py")


def pytest_collection_modifyitems(config, items):
    def rank(item) -> int:
        path = item.nodeid.split("::")[0]
        return SLOW_FILES.index(path) if path in SLOW_FILES else len(SLOW_FILES)

    items.sort(key=rank)  # stable: every other test keeps its order
