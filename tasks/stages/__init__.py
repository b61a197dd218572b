"""The stage functions, plain Python (no Prefect): each takes a `StageCall` and returns a typed reference.

A stage reads its inputs' artifacts (verifying their checksums), writes its own artifact under
``<cache>/<stage>/<key[:2]>/<key><ext>`` and returns a small reference; `tasks.graph` lists them per backend.
"""
