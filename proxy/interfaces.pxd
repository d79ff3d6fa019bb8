# Static types for the compiled build of interfaces.py (see setup.py).


cdef class ResponseSink:
    cdef public bint closing
    cdef public bint http11

    cpdef response_head(self, conn, int status)
    cpdef bytes response_extra(self)
    cpdef upstream_activity(self)
    cpdef response_complete(self, conn, bint reusable)
    cpdef upstream_failed(self, conn, exc)
    cpdef start_tunnel(self, conn)
    cpdef tunnel_data(self, bytes data)
    cpdef tunnel_closed(self)
    cpdef pause_reading_for_upstream(self)
    cpdef resume_reading_for_upstream(self)
    cpdef write(self, bytes data)
    cpdef close(self)
