# Static types for the compiled build of request.py (see setup.py).

cimport cython

from proxy.http1 cimport connection_close, field_kind, is_lower, line_end, plain_host, token_end

cdef frozenset _NOTHING_FORWARDED, _PLAIN_CONNECTION
cdef dict _SPECIAL_BY_LENGTH
cdef bytes _SPECIAL_HINTS, _URLCHAR
cdef int H_CL, H_CONN, H_COOKIE, H_HOST, H_TE, H_TOKEN, H_UNTRUSTED, H_UPGRADE, H_WSKEY, H_XFF
cdef dict SPECIAL


@cython.freelist(8)
@cython.final
cdef class Request:
    cdef public object body
    cdef public bint complete
    cdef public bytes content_length
    cdef public object forwarded
    cdef public bint head_done
    cdef public list headers
    cdef public bytes host
    cdef public bint keep_alive
    cdef public list lines
    cdef public bytes method
    cdef public bytes override
    cdef public object reject
    cdef public Py_ssize_t size
    cdef public bytes sticky
    cdef public bytes te
    cdef public bytes token
    cdef public object trailers
    cdef public bint upgrade
    cdef public bytes upgrade_value
    cdef public bytes url
    cdef public str version
    cdef public bytes ws_key
    cdef public bytes xff


@cython.locals(start=Py_ssize_t, i=Py_ssize_t, url_end=Py_ssize_t, line=Py_ssize_t, close=int,
               name_end=Py_ssize_t, value=Py_ssize_t, kind=int, keep_alive=bint,
               max_headers=Py_ssize_t, count=Py_ssize_t, run=Py_ssize_t, lines=list,
               method=bytes, host=bytes, override_name=bytes)
cpdef bint fast_head(Request req, bytes data, Py_ssize_t end, s) except -1

@cython.locals(lines=list, name=bytes, value=bytes, low=bytes, kind=int, url=bytes,
               host=bytes, override=bytes, cookie_override=bytes, te=bytes, xff=bytes)
cpdef read_head(Request req, s, bint trusted, bint http11)

@cython.locals(lines=list, host=bytes, xff=bytes)
cpdef bytes upstream_head(Request req, bytes host_header, str peer, bytes xff_line,
                          bytes proto_line, bytes upgrade_value)
