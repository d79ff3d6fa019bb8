# Static types for the compiled build of server.py (see setup.py).

cimport cython

from proxy.upstream cimport ConnectionPool


cdef class ProxyServer:
    cdef public object loop
    cdef public object config
    cdef public object settings
    cdef public ConnectionPool cpool
    cdef public set connections
    cdef public double now
    cdef public bint stopping
    cdef public double started_at
    cdef public list _servers
    cdef public object _tasks
    cdef public double _tick
    cdef public object _bad_requests
    cdef public double _bad_logged_at
    cdef public dict services
    cdef public object table
    cdef public object edge
    cdef public object observer
    cdef public object send_connect_failure

    cpdef note_bad_request(self, int status)
