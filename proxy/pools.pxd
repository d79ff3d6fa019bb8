# Static types for the compiled build of pools.py (see setup.py).

cimport cython

cdef class Pool:
    cdef public object color
    cdef public tuple upstreams
    cdef public Py_ssize_t _next

    @cython.locals(n=Py_ssize_t, start=Py_ssize_t, i=Py_ssize_t, ups=tuple)
    cpdef pick(self, exclude=*)
