# Static types for the compiled build of stats.py (see setup.py).

cimport cython

cdef tuple _BOUNDS
cdef Py_ssize_t _NBUCKETS
cdef bint _COMPILED


cdef class ColorTraffic:
    cdef public long long requests
    cdef public long long errors
    cdef public double latency_sum
    cdef public list counts

    @cython.locals(lo=Py_ssize_t, hi=Py_ssize_t, mid=Py_ssize_t, bound=double)
    cpdef record(self, int status, double latency)


cdef class Sample:
    cdef public double at
    cdef public long long requests
    cdef public long long errors
    cdef public double latency_sum
    cdef public tuple counts
