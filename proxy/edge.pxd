# Static types for the compiled build of edge.py (see setup.py).

from proxy.listener cimport ClientConnection


cdef class EdgeConnection(ClientConnection):
    cdef public object _edge
    cdef public object _proxied
    cdef public bint _tls

    cpdef bytes response_extra(self)
    cpdef _reply(self, reply)


cdef class EdgeListener:
    cdef public object edge
    cdef public object sock
    cdef public bint tls
    cdef public object loop
    cdef public Py_ssize_t pending
    cdef public bint _closed
    cdef public int _family
    cdef public dict _shaking
    cdef public object _timer
    cdef public object _factory
