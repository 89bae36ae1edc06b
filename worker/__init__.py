"""The Celery app and its tasks (generate, train).

Not built yet: it arrives with the worker issue. Tasks will be thin: claim the job, call
``core``, record the result.
"""
