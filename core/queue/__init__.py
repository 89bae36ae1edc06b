"""The queue: how a queued job reaches a worker and how its progress reaches a watcher.

- ``dispatch``: the transactional outbox (a job row and its message commit together), the relay
  that publishes it, claims with leases and fencing tokens, and Celery's queue configuration;
- ``fairness``: fair share between owners (the order in which queued jobs are claimed);
- ``eta``: queue positions and estimated start times from measured throughput;
- ``broker``: the publisher over Celery's wire protocol (kombu only, no Celery import);
- ``notify`` and ``event_hub``: job events over PostgreSQL LISTEN/NOTIFY (or polling on SQLite),
  fanned out to every open event stream of a process.

It may import ``core.runtime`` and ``core.db``; never ``core.services``, ``core.upkeep``,
``core.cli`` or torch.
"""
