# Static types for the compiled build of listener.py (see setup.py).

cimport cython

from proxy.exchange cimport Exchange

cdef int IDLE, HEAD, UPSTREAM, STREAM, TUNNEL, CLOSED
cdef int H_CL, H_CONN, H_COOKIE, H_HOST, H_TE, H_TOKEN, H_UNTRUSTED, H_UPGRADE, H_WSKEY, H_XFF
cdef dict SPECIAL
cdef frozenset _PLAIN_CONNECTION


cdef class ClientConnection(Exchange):
    cdef _reset_request(self)
    cdef _parse_failed(self, reply, list out)
    cdef _body(self, bytes body)
    cdef _request_complete(self)
    cdef _send_body(self, bytes data)
    @cython.locals(lines=list, name=bytes, value=bytes, low=bytes, kind=int, url=bytes,
                   host=bytes, override=bytes, token=bytes, cookie_override=bytes, sticky=bytes,
                   te=bytes, upgrade_value=bytes, xff=bytes, ws_key=bytes, content_length=bytes,
                   trusted=bint, is_upgrade=bint)
    cdef _dispatch(self, bytes method, str version, bint keep_alive, bint upgrade)
    cdef _after_upgrade_head(self, bytes rest)
    cdef _next_request(self)
