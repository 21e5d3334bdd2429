"""Test-wide settings: one torch thread (tests are small; on 2 shared cores a second intra-op
thread mostly spins against the loader's and writer's threads) and no hub access."""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # inherited by the CLI subprocesses too
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

torch.set_num_threads(1)
