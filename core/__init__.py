"""diffusion-queue's core: framework-free code that ``web`` and ``worker`` share.

Its packages, each depending only on those above it (``tests/test_import_graph.py`` checks it):

- ``runtime``: settings from ``DQ_*`` variables, logging, the machine, liveness files;
- ``db``: the records (SQLAlchemy models, engines and sessions, the one state-transition
  function, the triggers and migrations' entry point);
- ``storage``: object storage, over S3 or a local directory;
- ``diffusion``: the model (everything that imports torch);
- ``queue``: how a job reaches a worker (outbox and relay, claims, fair share, ETAs, the
  broker) and how its events reach a watcher;
- ``services``: the domain operations that ``web`` and ``worker`` call (jobs, batches, training
  runs, model versions, tokens, webhooks, audit);
- ``upkeep``: the background passes ``dq reaper`` runs (the reaper, retention);
- ``cli``: the ``dq`` command, one module per command group.

Nothing here imports Flask or Celery; only ``diffusion`` imports torch.
"""
