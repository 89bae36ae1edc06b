"""The Celery app and its tasks: generation jobs (queue ``generate``) and training runs (queue
``train``).

Tasks are thin: claim the row through ``core.db.transitions``, call ``core``, record the result.
``worker.app`` builds the Celery app from the settings; start workers with ``dq worker``.
"""
