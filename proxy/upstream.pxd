# Static types for the compiled build of upstream.py (see setup.py); the .py stays the
# source of truth and runs unchanged without a compiler.

cdef class UpstreamConnection:
    cdef public bint _body_until_eof
    cdef public int _framing
    cdef public list _headers
    cdef public bint _interim
    cdef public bint _keep_alive
    cdef public list _out
    cdef public bytes _reason
    cdef public object _trailers
    cdef public object client
    cdef public bint closed
    cdef public object connected
    cdef public bint done
    cdef public double idle_since
    cdef public bint is_head
    cdef public object parser
    cdef public ConnectionPool pool
    cdef public bint request_done
    cdef public bint response_started
    cdef public bint reused
    cdef public object transport
    cdef public bint tunnel
    cdef public bint upgrade_requested
    cdef public object upstream

    cdef _reset_exchange(self)
    cpdef send(self, bytes data)
    cpdef close(self)
    cpdef abort(self)
    cdef bint _reusable(self)
    cdef _fail(self, exc)
    cdef _finish_head_response(self, bytes data)
    cdef _start_tunnel(self, bytes rest)
    cdef bytes _head(self, int status, bytes extra, bint close, bint te)
    cdef bytes _final_head(self, int status, client)


cdef class ConnectionPool:
    cdef public double connect_timeout
    cdef public double keepalive
    cdef public int max_idle
    cdef public dict _idle
    cdef public set _all

    cpdef UpstreamConnection take_idle(self, upstream)
    cpdef release(self, UpstreamConnection conn)
    cpdef forget(self, UpstreamConnection conn)
