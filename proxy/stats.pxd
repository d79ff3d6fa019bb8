# Static types for the compiled build of stats.py (see setup.py).


cdef class ColorTraffic:
    cdef public long long requests
    cdef public long long errors
    cdef public double latency_sum
    cdef public list counts

    cpdef record(self, int status, double latency)
