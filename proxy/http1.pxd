# Static types for the compiled build of http1.py (see setup.py).

cimport cython

@cython.locals(k=Py_ssize_t)
cpdef bint is_lower(bytes data, Py_ssize_t start, Py_ssize_t end, bytes lowered) except -1
@cython.locals(candidates=tuple, name=bytes, kind=int)
cpdef int field_kind(bytes data, Py_ssize_t start, Py_ssize_t end, dict table) except -2
