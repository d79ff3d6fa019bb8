# Compiled with the hot path (see setup.py): the request path calls ``request`` as a C
# method with C values (proxy/exchange.pxd), and the line is made in C.

cimport cython

from proxy.logformat cimport LineFormatter


cdef class AccessLog:
    cdef public object _format
    cdef public LineFormatter _lines
    cdef public int _rejected
    cdef public long long _second
    cdef public object _summary_timer
    cdef public int _suppressed
    cdef public object _timer
    cdef public bint closed
    cdef public str format
    cdef public object loop
    cdef public list pending
    cdef public int rejections_per_second
    cdef public double sample
    cdef public object sink
    cpdef request(self, double end, str client, bytes method, bytes target, bint http11,
                  int status, Py_ssize_t bytes_in, Py_ssize_t bytes_out, double duration,
                  double upstream_time, str service, color, reason, upstream, bytes rid,
                  head, tls, sni)
    @cython.locals(pending=list)
    cdef _append(self, str line)
    @cython.locals(pending=list, pieces=list, start=Py_ssize_t, size=Py_ssize_t,
                   i=Py_ssize_t, n=Py_ssize_t, most=Py_ssize_t)
    cpdef flush(self)
