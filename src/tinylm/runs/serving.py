"""`tinylm serve`: load each model a user names and run the completions server over them on uvicorn."""

from __future__ import annotations

import signal
from pathlib import Path

import torch

from tinylm.errors import TinylmError
from tinylm.infer.openai_api import Limits, ServedModel
from tinylm.runs.loading import load_model


def model_name(path: str) -> str:
    """A model's name on the server: a local directory's name, or a hub id as it was typed."""
    local = Path(path)
    return local.resolve().name if local.exists() else path


def load_served(paths: list[str], names: list[str] | None = None, which: str = "best",
                device: str | torch.device = "cpu") -> list[ServedModel]:
    """Each run directory, Hugging Face directory or hub id, loaded and named (by `names` in order, else by
    model_name); two models may not share a name."""
    if names and len(names) != len(paths):
        raise TinylmError(f"--name was given {len(names)} time(s) for {len(paths)} model(s): give one per model")
    chosen = names or [model_name(p) for p in paths]
    clashes = sorted({n for n in chosen if chosen.count(n) > 1})
    if clashes:
        raise TinylmError(f"two models would be named '{clashes[0]}': name each with --name")
    served = []
    for path, name in zip(paths, chosen, strict=True):
        loaded = load_model(path, which, device=device)
        served.append(ServedModel(name, loaded.model, loaded.tokenizer, loaded.recipe.sample.settings,
                                  loaded.recipe.data.framing, loaded.end_ids))
    return served


def serve(models: list[ServedModel], host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          limits: Limits = Limits(), compiled: str | None = None) -> None:
    """Serve until SIGINT or SIGTERM: in-flight streams get a few seconds to finish, then are cancelled. `compiled`:
    decode with the compiled step in that dtype (models/compiled.py)."""
    import uvicorn

    from tinylm.infer.server import cancel_all, create_app

    if not 0 <= port < 65536:
        raise TinylmError(f"--port must be in [0, 65535], got {port}")
    app = create_app(models, api_key, limits, compiled=compiled)

    class Server(uvicorn.Server):
        def handle_exit(self, sig, frame) -> None:
            cancel_all(app)  # streams end at the next step with a last chunk, so connections close at once
            super().handle_exit(sig, frame)

    config = uvicorn.Config(app, host=host, port=port, log_level="info", timeout_graceful_shutdown=5,
                            limit_concurrency=4 * (limits.max_queue + limits.max_batch))
    # uvicorn sends SIGTERM again once its shutdown is done; by then the server has stopped cleanly: exit 0
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: None)
    try:
        Server(config).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
