"""What a client connection is doing, for the sweeper: what a passed deadline means.

A leaf module: the server and the exchange both read these, and the compiled build's
C types make the two import each other.
"""

IDLE, HEAD, UPSTREAM, STREAM, TUNNEL, CLOSED = range(6)
