"""Shared fixtures: the real SmolLM2 folder and a tiny random Llama with its tokenizer."""

from __future__ import annotations

import os

import pytest


def pytest_configure(config) -> None:
    """Under pytest-xdist (`make test`), the cores are shared out among the workers, so
    torch threads do not oversubscribe them."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        import torch

        threads = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(threads)
        # the same count in the runs the tests start, so a subprocess's fp32 rounding
        # matches the worker's (resumed-vs-uninterrupted tests compare bit for bit)
        os.environ["OMP_NUM_THREADS"] = str(threads)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct, converted once from the package's GGUF (cached)."""
    from dfo_lora.backbone.loading import converted_gguf_folder, preset_gguf

    return converted_gguf_folder(preset_gguf("smollm2-135m"), "smollm2-135m")


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, smollm2_dir):
    """A 3-layer random Llama (hidden 32) saved with the real SmolLM2 tokenizer.

    Real tokenizer and real task data, tiny compute: end-to-end runs take seconds.
    """
    from tests.tiny_models import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"), smollm2_dir)


@pytest.fixture
def no_network(monkeypatch) -> list:
    """Every socket connect is recorded and refused: the hub must not be reached."""
    import socket

    attempts = []

    def refuse(self, address, *args):
        attempts.append(address)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    return attempts
