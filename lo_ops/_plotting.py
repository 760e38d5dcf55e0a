"""matplotlib for the command line's plots, when it is installed (the ``examples`` extra)."""

from __future__ import annotations


def pyplot():
    """``matplotlib.pyplot`` with a file-only backend, or None (after saying so) without it."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'lo_ops[examples]')")
        return None
    return plt
