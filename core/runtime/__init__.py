"""The plumbing every process shares: typed settings read from ``DQ_*`` variables (``settings``),
JSON logging with request and job ids (``logs``), the machine's description for benchmark tables
(``machine``) and liveness files for probes (``liveness``).

Owns no records and no queue. It imports nothing else of ``core``: every other package may import
it.
"""
