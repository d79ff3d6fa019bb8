# Static types for the compiled build of router.py (see setup.py).

cdef dict _DECISIONS, _ACTIVE, _OVERRIDE
cdef int _N

cimport cython


cdef class Decision:
    cdef public object color
    cdef public object reason
    cdef public bint set_sticky


@cython.locals(n=Py_ssize_t, bucket=int, digit=int, ch=Py_UCS4)
cpdef int sticky_bucket(str value)
cdef int _blue_cut(int blue, int green)
@cython.locals(cut=int, bucket=int)
cpdef route(attrs, state, double roll)
@cython.locals(cut=int, low=int, high=int)
cpdef int cookie_bucket(Decision decision, state, double roll)
