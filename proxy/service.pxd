# Static types for the compiled build of service.py (see setup.py).

cimport cython

from proxy.stats cimport ColorTraffic


cdef class Service:
    cdef public object runtime
    cdef public str name
    cdef public object config
    cdef public object settings
    cdef public object store
    cdef public object registry
    cdef public object tls_contexts
    cdef public dict pools
    cdef public dict in_flight
    cdef public dict websockets
    cdef public dict status_counts
    cdef public object upstream_errors
    cdef public object traffic
    cdef public dict _traffic
    cdef public dict _color_idle
    cdef public object idle
    cdef public set tunnels
    cdef public object drain

    # The request path's counters.
    cpdef begin_request(self, color)
    cpdef end_request(self, color)
    cpdef _now_idle(self, color)
    @cython.locals(traffic=ColorTraffic, counts=dict)
    cpdef record_response(self, color, int status, double latency)
    cpdef note_upstream_error(self, color, str kind)
