# Static types for the compiled build of upstream.py (see setup.py); the .py stays the
# source of truth and runs unchanged without a compiler.

cimport cython

from proxy.interfaces cimport ResponseSink
from proxy.response cimport ResponseReader

cdef bint _FAST

from proxy.http1 cimport head_end


cdef class UpstreamConnection(ResponseReader):
    cdef public bint closed
    cdef public object connected
    cdef public double idle_since
    cdef public ConnectionPool pool
    cdef public bint reused
    cdef public object transport
    cdef public object upstream

    cpdef begin(self, ResponseSink client, bint is_head, bint upgrade)
    cpdef send(self, bytes data)
    cpdef close(self)
    cpdef abort(self)
    cdef _fail(self, exc)
    cdef _start_tunnel(self, bytes rest)


cdef class ConnectionPool:
    cdef public double connect_timeout
    cdef public double keepalive
    cdef public int max_idle
    cdef public dict _idle
    cdef public set _all
    cdef public object tls_log

    @cython.locals(stack=list)
    cpdef UpstreamConnection take_idle(self, upstream)
    @cython.locals(stack=list)
    cpdef release(self, UpstreamConnection conn)
    cpdef forget(self, UpstreamConnection conn)
