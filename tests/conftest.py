"""Test-wide settings: one torch thread (tests are small; on 2 shared cores a second intra-op
thread mostly spins against the loader's and writer's threads) and no hub access."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

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
