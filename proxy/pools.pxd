# Static types for the compiled build of pools.py (see setup.py).

cdef class Pool:
    cdef public object color
    cdef public tuple upstreams
    cdef public Py_ssize_t _next

    cpdef pick(self, exclude=*)
