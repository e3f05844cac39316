"""Run the app under uvicorn with graceful shutdown.

SIGTERM / SIGINT: the server stops accepting connections and new requests (503), lets the
running requests finish for up to ``shutdown_grace_s`` seconds, then cancels the rest
(their slots and KV blocks are freed), stops the engine thread and returns normally, so
``mor serve`` exits 0. A second SIGINT exits at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading

import uvicorn

from .app import ServeConfig, ServerState, create_app


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, state: ServerState):
        super().__init__(config)
        self.mor_state = state
        self.bound: tuple[str, int] | None = None

    @contextlib.contextmanager
    def capture_signals(self):
        # like uvicorn's, without re-raising the signal afterwards: a graceful stop exits 0
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        sigs = (signal.SIGINT, signal.SIGTERM)
        old = {s: signal.signal(s, self.handle_exit) for s in sigs}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    def handle_exit(self, sig, frame) -> None:
        self.mor_state.draining = True  # new requests on open connections get 503
        super().handle_exit(sig, frame)

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if self.servers and self.servers[0].sockets:
            host, port = self.servers[0].sockets[0].getsockname()[:2]
            self.bound = (host, port)
            print(f"mor serve: {self.mor_state.name} on http://{host}:{port} (OpenAI API under /v1)", flush=True)


def build_server(cfg: ServeConfig, state: ServerState | None = None) -> _Server:
    """A uvicorn server for ``cfg`` (the checkpoint is loaded now). ``server.run()`` serves
    until a signal or ``server.should_exit = True``."""
    state = state or ServerState(cfg)
    app = create_app(cfg, state)
    config = uvicorn.Config(app, host=cfg.host, port=cfg.port, log_level=cfg.log_level,
                            access_log=cfg.log_level in ("debug", "trace"),
                            timeout_graceful_shutdown=cfg.shutdown_grace_s, lifespan="on")
    return _Server(config, state)


def serve(cfg: ServeConfig) -> dict:
    """Serve until stopped; returns what was served (requests, tokens)."""
    server = build_server(cfg)
    try:
        server.run()
    except SystemExit:  # uvicorn exits when it cannot bind
        if server.bound is not None:
            raise
    st = server.mor_state
    if server.bound is None:
        raise OSError(f"could not listen on {cfg.host}:{cfg.port} (address in use?)")
    stats = st.engine.stats
    print(f"mor serve: stopped after {stats.requests_finished} finished requests", file=sys.stderr)
    return {"model": st.name, "checkpoint": str(cfg.checkpoint), "url": f"http://{server.bound[0]}:{server.bound[1]}",
            "requests_finished": stats.requests_finished, "generated_tokens": stats.generated_tokens,
            "preemptions": stats.preemptions}
