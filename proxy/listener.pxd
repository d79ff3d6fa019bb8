# Static types for the compiled build of listener.py (see setup.py).

cimport cython

from proxy.exchange cimport Exchange

cdef int IDLE, HEAD, UPSTREAM, STREAM, TUNNEL, CLOSED
cdef bint _FAST
cdef bytes HTTP_PROTO, HTTPS_PROTO

from proxy.http1 cimport head_end
from proxy.request cimport Request, fast_head, read_head, upstream_head
from proxy.hosts cimport ServiceTable
from proxy.pools cimport Pool
from proxy.service cimport Service
from proxy.router cimport Decision, cookie_bucket, route


cdef class ClientConnection(Exchange):
    cdef _reset_request(self, Request req)
    @cython.locals(table=ServiceTable)
    cdef Service _match_service(self, bytes host, bytes url)
    @cython.locals(req=Request)
    cdef bint _fast_request(self, bytes data, Py_ssize_t end) except -1
    cdef _parse_failed(self, reply, list out)
    cdef _body(self, bytes body)
    cdef _request_complete(self)
    cdef _send_body(self, bytes data)
    @cython.locals(http11=bint)
    cdef _dispatch(self, Request req)
    @cython.locals(is_upgrade=bint, service=Service, value=bytes, override=bytes, sticky=bytes,
                   token=bytes, cl=bytes, roll=double,
                   decision=Decision)
    cdef _route_and_send(self, Request req, bint upgrade)
    cdef _take_observed(self, Request req, observer, bint trusted)
    cdef _observe(self, observer, Request req)
    cdef _after_upgrade_head(self, bytes rest)
    cdef _next_request(self)
