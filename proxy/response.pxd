# Static types for the compiled build of response.py (see setup.py).

cimport cython

from proxy.interfaces cimport ResponseSink

cdef dict _STATUS_LINES
cdef frozenset _NO_BODY_STATUS
cdef int _R_CL, _R_TE, _R_CONN, _R_HOP
cdef dict _RESPONSE_SPECIAL
cdef dict _CONN_VALUES
cdef int _RAW, _CHUNKED, _NONE
cdef dict _SPECIAL_BY_LENGTH
cdef bytes _SPECIAL_HINTS

from proxy.http1 cimport connection_close, field_kind, line_end, token_end

@cython.locals(line=bytes)
cdef bytes _status_line(int status, bytes reason)


cdef _end_head(list lines, ResponseSink client)


cdef class ResponseReader:
    cdef public bint _body_until_eof
    cdef public int _framing
    cdef public list _headers
    cdef public bint _interim
    cdef public bint _keep_alive
    cdef public list _out
    cdef public bytes _reason
    cdef public object _trailers
    cdef public ResponseSink client
    cdef public bint at_start
    cdef public Py_ssize_t _remaining
    cdef public bint done
    cdef public bint is_head
    cdef public object parser
    cdef public bint request_done
    cdef public bint response_started
    cdef public bint tunnel
    cdef public bint upgrade_requested

    cdef _reset_exchange(self)
    cdef bint _reusable(self)
    @cython.locals(i=Py_ssize_t, j=Py_ssize_t, c=int, status=int, line=Py_ssize_t, close=int,
                   run=Py_ssize_t, length=Py_ssize_t, keep_alive=bint, name_end=Py_ssize_t,
                   value=Py_ssize_t, value_end=Py_ssize_t, nxt=Py_ssize_t, kind=int,
                   parts=list, body=Py_ssize_t)
    cdef bint _fast_response(self, bytes data, Py_ssize_t end) except -1
    @cython.locals(remaining=Py_ssize_t)
    cdef _fast_body(self, bytes data)
    cdef _fast_end(self)
    cdef _finish_head_response(self, bytes data)
    cdef _end_close_delimited(self, ResponseSink client)
    cdef bytes _head(self, int status, bytes extra, bint close, bint te)
    @cython.locals(lines=list, has_cl=bint, has_te=bint, name=bytes, value=bytes, low=bytes,
                   kind=int, te=bint)
    cdef bytes _final_head(self, int status, ResponseSink client)
