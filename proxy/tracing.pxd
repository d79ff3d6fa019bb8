# Compiled with the hot path (see setup.py): a request ID is made per request while the
# access log is on, and a Python method call cost more than the ID itself.

cdef class RequestIds:
    cdef public long long count
    cdef public bytes prefix
    cpdef bytes next(self)
