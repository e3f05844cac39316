"""``mor serve``: an OpenAI-compatible HTTP server on the continuous-batching engine
(docs/serving.md). Needs the ``[serve]`` extra (FastAPI, uvicorn, prometheus-client).

Parts: ``protocol`` (request bodies, OpenAI-style errors), ``chat`` (chat templates),
``bridge`` (the engine thread and its asyncio bridge), ``metrics`` (Prometheus),
``app`` (the FastAPI app), ``server`` (uvicorn with graceful shutdown), ``cli``.
"""
