"""Serving: a bundle of artifacts, the request pipeline (no HTTP), and the HTTP service around it.

- ``config.py``: the pipeline's knobs (they travel inside a bundle);
- ``bundle.py``: one directory with every artifact a request needs, versioned and verified;
- ``runtime.py``: the exported ranker in ONNX Runtime (no torch on the rank path);
- ``match.py``: the match stage for one online request (retrieval's sources and merge);
- ``rules.py``: business rules after ranking (seen filter, per-category cap);
- ``guard.py``: the feature store behind a breaker, so that a dead Redis costs one timeout;
- ``pipeline.py``: retrieve -> pre-rank -> rank -> rules -> top K, plain Python;
- ``settings.py``, ``schemas.py``, ``metrics.py``, ``app.py``: the FastAPI service;
- ``server.py``: running it (``bstrec serve``; a background server for tests and the quickstart).
"""
