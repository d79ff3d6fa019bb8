# Static types for the compiled build of router.py (see setup.py).

cdef dict _DECISIONS, _ACTIVE, _OVERRIDE

cpdef route(attrs, state, double roll)
