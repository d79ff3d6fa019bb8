# Compiled with the hot path (see setup.py): a request's line is made on its callback,
# so the common line is C values joined in C, and the scans over client-given bytes
# (escaping check, user agent and referer) are C loops.

cimport cython

# The bytes slice without a slice object (see http1.pxd).
from proxy.http1 cimport line_end

cdef bint _COMPILED
cdef bytes _AGENT, _REFERER, _HTTP11, _HTTP10
cdef object _UNSET

@cython.locals(c=int)
cdef bint _plain(bytes value) except -1
cpdef tuple head_fields(object head)
@cython.locals(n=Py_ssize_t, i=Py_ssize_t)
cdef tuple _scan(bytes head)
@cython.locals(m=Py_ssize_t, k=Py_ssize_t, c=int)
cpdef bint _named(bytes head, Py_ssize_t at, bytes name) except -1
@cython.locals(n=Py_ssize_t, e=Py_ssize_t)
cdef bytes _value(bytes head, Py_ssize_t i)
@cython.locals(low=bytes)
cpdef tuple header_values(object head)
@cython.locals(i=Py_ssize_t)
cdef object _field(bytes head, bytes low, bytes name)


cdef class _Clock:
    cdef public double offset
    cdef public long long _second
    cdef public str _iso
    cdef public bytes _clf
    cdef public str _clf_str
    cdef public long long _ms
    cdef public str _ms_str
    cpdef refresh(self)
    cdef _set(self, long long second)
    cpdef bytes iso(self, double mono)
    @cython.locals(ms=cython.longlong, second=cython.longlong, text=str)
    cpdef str iso_text(self, double mono)
    @cython.locals(second=cython.longlong)
    cpdef bytes clf(self, double mono)
    cpdef str clf_text(self, double mono)


cdef class _Names:
    cdef public dict _clf
    cdef public dict _json
    cdef public dict _text
    cpdef str text(self, value)
    cpdef str segment(self, str service, str color, str reason, str upstream)
    cpdef str clf(self, str client)
    cpdef bytes json(self, value)


@cython.locals(status=int, bytes_in=Py_ssize_t, bytes_out=Py_ssize_t, duration=double,
               upstream_time=double, method=bytes, target=bytes, rid=bytes, version=bytes,
               common=str)
cpdef bytes format_json(tuple rec, _Clock clock, _Names names)
@cython.locals(us=cython.longlong, up_us=cython.longlong, n=Py_ssize_t, texts=dict, line=str)
cdef str _json_line(_Clock clock, _Names names, str segment, double end, str client,
                    bytes method, bytes target, bytes version, int status, Py_ssize_t bytes_in,
                    Py_ssize_t bytes_out, double duration, double upstream_time, bytes rid,
                    bytes agent, bytes referer, tls)
@cython.locals(n=Py_ssize_t)
cdef Py_ssize_t _given_size(bytes method, bytes target, bytes version, bytes rid, bytes agent,
                            bytes referer, Py_ssize_t cap) except -2
cdef tuple _QUOTE, _STATUS
cdef Py_ssize_t _LINE_MAX
cdef str _text(bytes value)
cdef str _status_text(int status)
@cython.locals(common=str)
cpdef bytes format_combined(tuple rec, _Clock clock, _Names names)
cdef str _combined_segment(str service, str color)
@cython.locals(x=double, ms=cython.longlong, seconds=str, line=str)
cdef str _combined_line(_Clock clock, _Names names, str segment, double end, str client,
                        bytes method, bytes target, bytes version, int status,
                        Py_ssize_t bytes_out, double duration, bytes rid, bytes agent,
                        bytes referer)
cdef str _dashed(bytes value)


cdef class LineFormatter:
    cdef public object _color
    cdef public object _reason
    cdef public str _segment_text
    cdef public object _service
    cdef public object _upstream
    cdef public _Clock clock
    cdef public bint json
    cdef public _Names names
    @cython.locals(version=bytes, line=str)
    cpdef str request(self, double end, str client, bytes method, bytes target, bint http11,
                      int status, Py_ssize_t bytes_in, Py_ssize_t bytes_out, double duration,
                      double upstream_time, str service, color, reason, upstream, bytes rid,
                      head, tls, sni)
    cdef _new_segment(self, str service, color, reason, upstream)
