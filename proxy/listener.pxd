# Static types for the compiled build of listener.py (see setup.py).

cimport cython

from proxy.dispatch cimport Dispatcher

cdef int IDLE, HEAD, UPSTREAM, STREAM, TUNNEL, CLOSED
cdef bint _FAST
cdef bytes HTTP_PROTO, HTTPS_PROTO

from proxy.http1 cimport head_end
from proxy.request cimport Request, fast_head


cdef class ClientConnection(Dispatcher):
    cdef _reset_request(self, Request req)
    @cython.locals(req=Request)
    cdef bint _fast_request(self, bytes data, Py_ssize_t end) except -1
    cdef _parse_failed(self, reply, list out)
    cdef _body(self, bytes body)
    cdef _request_complete(self)
    cdef _send_body(self, bytes data)
    cdef _after_upgrade_head(self, bytes rest)
    cdef _next_request(self)
