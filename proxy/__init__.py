"""bgproxy data plane: listener, router, forwarding, pools and the routing state."""

from proxy import _hotpath  # noqa: F401 - picks the compiled or pure-Python hot path first

__version__ = "0.1.0"
