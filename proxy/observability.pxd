# Compiled with the hot path (see setup.py): with request IDs on, every request asks
# ``rewrites`` whether its head carries the ID or traceparent, and the exchange reads
# ``access`` when it ends.

cimport cython

from proxy.accesslog cimport AccessLog
from proxy.logformat cimport _named

cdef bint _COMPILED


cdef class Observer:
    cdef public tuple _marks
    cdef public tuple _names
    cdef public AccessLog access
    cdef public object exporter
    cdef public bytes id_header
    cdef public bytes id_line
    cdef public object ids
    cdef public dict reasons
    cdef public object tracer
    cdef public bint watch
    @cython.locals(i=Py_ssize_t, names=tuple, name=bytes)
    cpdef bint rewrites(self, bytes head) except -1
