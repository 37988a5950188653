"""`deleaker serve`: an HTTP image-generation server over the Pipeline, with dynamic batching.

Modules, one job each:
    options   ServeOptions: batching, queue, timeout and request limits (dataclass, CLI defaults)
    schema    the request/response bodies (OpenAI images API shape + DeLeaker fields), request -> GenerateRequests
    batcher   the dynamic batcher: a bounded queue and one worker thread calling Pipeline.generate
    engine    admission (validation), warm-up, drain; runs jobs on a batcher (or Ray Serve's @serve.batch)
    metrics   Prometheus metrics
    app       the FastAPI application (routes, errors, auth, body limit)
    ray_app   the same application as a Ray Serve deployment (replicas, @serve.batch, autoscaling)
    client    a small Python client
    cli       `deleaker serve ...`

Nothing here is imported by `deleaker.runtime` itself: fastapi/uvicorn/ray load only for `deleaker serve`.
"""
