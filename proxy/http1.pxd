# Static types for the compiled build of http1.py (see setup.py).

cimport cython

# Every module that cimports from here slices bytes without a slice object. Cython
# compiles ``data[a:b]`` on bytes to PySequence_GetSlice, which builds a slice object
# and unpacks it again (~550 instructions, six times per proxied request); for exact
# bytes and in-range indices this is one PyBytes_FromStringAndSize. Anything else takes
# the real PySequence_GetSlice, so the result is always what Python's slice gives.
cdef extern from *:
    """
    static CYTHON_INLINE PyObject *bg_bytes_slice(PyObject *o, Py_ssize_t a, Py_ssize_t b) {
        if (PyBytes_CheckExact(o) && a >= 0 && b >= a) {
            Py_ssize_t n = PyBytes_GET_SIZE(o);
            if (b > n) b = n;
            if (a > b) a = b;
            return PyBytes_FromStringAndSize(PyBytes_AS_STRING(o) + a, b - a);
        }
        return PySequence_GetSlice(o, a, b);
    }
    #define PySequence_GetSlice(o, a, b) bg_bytes_slice(o, a, b)
    """

cdef bytes TCHAR, VCHAR, NAMECHAR

@cython.locals(n=Py_ssize_t, e=Py_ssize_t, c=int)
cpdef Py_ssize_t head_end(bytes data) except -2
cpdef Py_ssize_t token_end(bytes data, Py_ssize_t i) except -2
cpdef Py_ssize_t line_end(bytes data, Py_ssize_t i) except -2
@cython.locals(i=Py_ssize_t, c=int)
cpdef bint plain_host(bytes data, Py_ssize_t start, Py_ssize_t end) except -1

@cython.locals(k=Py_ssize_t)
cpdef bint is_lower(bytes data, Py_ssize_t start, Py_ssize_t end, bytes lowered) except -1
cpdef int connection_close(bytes data, Py_ssize_t start, Py_ssize_t end) except -2
@cython.locals(candidates=tuple, name=bytes, kind=int, n=Py_ssize_t)
cpdef int field_kind(bytes data, Py_ssize_t start, Py_ssize_t end, dict table, bytes hints) except -2
