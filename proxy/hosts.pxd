# Static types for the compiled build of hosts.py (see setup.py).

cimport cython

cdef object _UNSEEN


cdef class ServiceTable:
    cdef public dict _exact
    cdef public dict _suffixes
    cdef public object _any
    cdef public object default
    cdef public dict _memo
    cdef public object only

    cdef _routes(self, bytes host)
    @cython.locals(routes=list, prefix=bytes, below=bytes, n=Py_ssize_t, k=Py_ssize_t)
    cpdef match(self, bytes host, bytes target)
