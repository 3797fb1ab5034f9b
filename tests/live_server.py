"""A live tinylm server for tests: uvicorn on a free loopback port, in a thread, stopped when the block ends."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

import torch
import uvicorn

from test_generate import make_run
from tinylm.infer.server import create_app
from tinylm.runs.serving import load_served
from tinylm.train.checkpoints import save_checkpoint


def scaled_run(path: Path, name: str = "aurelius-4m", sets: tuple[str, ...] = (), scale: float = 3.0) -> Path:
    """make_run's run (a byte tokenizer) with its weights scaled up and saved as a later checkpoint: random weights
    then write varied text rather than one byte over and over."""
    model, _, tokenizer = make_run(path, name, sets)
    with torch.no_grad():
        for key, p in model.named_parameters():
            if "norm" not in key:
                p.mul_(scale)
        model.tok_embeddings.weight[256:] = 0  # BOS and EOS (tied: their logits are 0) rarely end a row at once
    save_checkpoint(path / "checkpoints", 2, model, {"step": 2}, {"tokenizer_fingerprint": tokenizer.fingerprint()})
    return path


@contextlib.contextmanager
def live_server(paths: list[Path], startup_s: float = 30.0, **app_options):
    """Yields the base URL (http://127.0.0.1:PORT) of a server over these runs."""
    app = create_app(load_served([str(p) for p in paths]), **app_options)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + startup_s
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the server did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(15)
        sock.close()
