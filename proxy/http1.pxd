# Static types for the compiled build of http1.py (see setup.py).

cimport cython

cdef bytes TCHAR, VCHAR

cpdef Py_ssize_t token_end(bytes data, Py_ssize_t i) except -2
cpdef Py_ssize_t line_end(bytes data, Py_ssize_t i) except -2

@cython.locals(k=Py_ssize_t)
cpdef bint is_lower(bytes data, Py_ssize_t start, Py_ssize_t end, bytes lowered) except -1
@cython.locals(candidates=tuple, name=bytes, kind=int)
cpdef int field_kind(bytes data, Py_ssize_t start, Py_ssize_t end, dict table) except -2
