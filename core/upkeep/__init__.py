"""Background passes over the records, run by ``dq reaper``: the reaper itself (requeueing jobs
whose lease ran out, finishing batches, relaying the outbox) and retention (pruning old jobs,
their images and their audit trail).

It may import ``core.runtime``, ``core.db``, ``core.storage``, ``core.queue`` and
``core.services``; never ``core.cli`` or torch.
"""
