# Static types for the compiled build of listener.py (see setup.py).

cimport cython

from proxy.exchange cimport Exchange

cdef int IDLE, HEAD, UPSTREAM, STREAM, TUNNEL, CLOSED
cdef int H_CL, H_CONN, H_COOKIE, H_HOST, H_TE, H_TOKEN, H_UNTRUSTED, H_UPGRADE, H_WSKEY, H_XFF
cdef dict SPECIAL
cdef frozenset _PLAIN_CONNECTION, _NOTHING_FORWARDED
cdef bint _FAST
cdef bytes _URLCHAR
cdef dict _SPECIAL_BY_LENGTH
cdef bytes _SPECIAL_HINTS

from proxy.http1 cimport connection_close, field_kind, head_end, is_lower, line_end, plain_host, token_end
from proxy.hosts cimport ServiceTable
from proxy.pools cimport Pool
from proxy.service cimport Service
from proxy.router cimport route


cdef class ClientConnection(Exchange):
    cdef _reset_request(self)
    @cython.locals(table=ServiceTable)
    cdef Service _match_service(self, bytes host, bytes url)
    @cython.locals(start=Py_ssize_t, i=Py_ssize_t, url_end=Py_ssize_t, line=Py_ssize_t, close=int,
                   name_end=Py_ssize_t, value=Py_ssize_t, kind=int, keep_alive=bint,
                   max_headers=Py_ssize_t, count=Py_ssize_t, run=Py_ssize_t, lines=list,
                   method=bytes, host=bytes, override_name=bytes)
    cdef bint _fast_request(self, bytes data, Py_ssize_t end) except -1
    cdef _parse_failed(self, reply, list out)
    cdef _body(self, bytes body)
    cdef _request_complete(self)
    cdef _send_body(self, bytes data)
    @cython.locals(lines=list, name=bytes, value=bytes, low=bytes, kind=int, url=bytes,
                   host=bytes, override=bytes, token=bytes, cookie_override=bytes, sticky=bytes,
                   te=bytes, upgrade_value=bytes, xff=bytes, ws_key=bytes, content_length=bytes,
                   trusted=bint, is_upgrade=bint)
    cdef _dispatch(self, bytes method, str version, bint keep_alive, bint upgrade)
    @cython.locals(is_upgrade=bint, pool=Pool, service=Service)
    cdef _route_and_send(self, bytes method, list lines, bytes host, bytes override,
                         bytes sticky, bytes token, bint upgrade, bytes upgrade_value,
                         bytes ws_key, bytes te, bytes content_length, bytes xff, forwarded)
    cdef _after_upgrade_head(self, bytes rest)
    cdef _next_request(self)
