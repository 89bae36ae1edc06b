"""``python -m core.cli``: the ``dq`` command, for a checkout without the entry point installed."""

from core.cli import main

if __name__ == "__main__":  # not when a walk over core's modules imports this one
    main()
