"""The domain services that ``web`` and ``worker`` call: each function validates a request, writes
its records in one transaction, and queues what follows.

- ``jobs`` and ``batches``: generation requests, their validation, submission and listing;
- ``training_runs``: admin training runs;
- ``model_versions``: the model versions a worker may serve, which one is active, which one a
  request picks, retiring and importing one; ``model_rollout``: activation behind the eval gate,
  and the canary;
- ``tokens``: API tokens, their roles and fair-share weights;
- ``uploads`` and ``images``: the images sent to edit (init images, masks), checked, kept as bare
  PNGs, and named by jobs;
- ``webhooks``: job webhooks, from the target's SSRF guard to signed delivery and its log;
- ``audit``: the audit log every admin action writes.

It may import ``core.runtime``, ``core.db``, ``core.storage`` and ``core.queue``; never
``core.upkeep``, ``core.cli`` or torch.
"""
