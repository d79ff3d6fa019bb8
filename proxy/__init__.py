"""bgproxy data plane: listener, router, forwarding, pools and the routing state."""

__version__ = "0.1.0"
