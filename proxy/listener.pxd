# Static types for the compiled build of listener.py (see setup.py).

from proxy.exchange cimport Exchange


cdef class ClientConnection(Exchange):
    cdef _reset_request(self)
    cdef _parse_failed(self, reply, list out)
    cdef _body(self, bytes body)
    cdef _request_complete(self)
    cdef _send_body(self, bytes data)
    cdef _dispatch(self, bytes method, str version, bint keep_alive, bint upgrade)
    cdef _after_upgrade_head(self, bytes rest)
    cdef _next_request(self)
