"""Test-wide settings."""

import os

import torch

# Under pytest-xdist each worker is its own process: one torch thread each keeps the 2-core CI
# machine from being oversubscribed.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
