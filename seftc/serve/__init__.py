"""`seftc serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) over the decode engine
(`seftc.runtime.engine`) on the sparse runtime. Needs the `serve` extra: `pip install seftc[serve]`.

    seftc.serve.protocol   request and response bodies, the OpenAI error shape
    seftc.serve.metrics    Prometheus metrics
    seftc.serve.app        the app: validation, engine bridge, SSE streaming
    seftc.serve.server     loading, uvicorn, graceful shutdown
"""
