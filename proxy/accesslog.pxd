# Compiled with the hot path (see setup.py), though it runs off the request's callback:
# a line is all Python-object work, which the compiled build does in a fraction of the
# interpreter's instructions (C calls, C integers in the f-string, no frame per helper).

cimport cython

cdef bytes _PLAIN

@cython.locals(i=Py_ssize_t)
cdef object _field(bytes head, bytes low, bytes name)
@cython.locals(low=bytes)
cpdef tuple header_values(object head)
@cython.locals(status=int, bytes_in=Py_ssize_t, bytes_out=Py_ssize_t, duration=double,
               upstream_time=double, us=cython.longlong, up_us=cython.longlong, method=bytes,
               target=bytes, rid=bytes, given=bytes, line=str, texts=dict, version=bytes)
cpdef bytes format_json(tuple rec, clock, names)
cdef str _quoted(bytes value)
