# Static types for the compiled build of server.py (see setup.py).

cimport cython

from proxy.stats cimport ColorTraffic
from proxy.upstream cimport ConnectionPool


cdef class ProxyServer:
    cdef public object loop
    cdef public object config
    cdef public object settings
    cdef public object store
    cdef public object registry
    cdef public dict pools
    cdef public ConnectionPool cpool
    cdef public set connections
    cdef public double now
    cdef public bint stopping
    cdef public dict in_flight
    cdef public dict websockets
    cdef public dict status_counts
    cdef public object upstream_errors
    cdef public object traffic
    cdef public dict _traffic
    cdef public double started_at
    cdef public list _servers
    cdef public set _tasks
    cdef public double _tick
    cdef public object _idle
    cdef public object _bad_requests
    cdef public double _bad_logged_at
    cdef public dict _color_idle
    cdef public set tunnels
    cdef public object drain

    # The request path's counters.
    cpdef begin_request(self, color)
    cpdef end_request(self, color)
    cpdef _now_idle(self, color)
    @cython.locals(traffic=ColorTraffic, counts=dict)
    cpdef record_response(self, color, int status, double latency)
    cpdef note_bad_request(self, int status)
    cpdef note_upstream_error(self, color, str kind)
