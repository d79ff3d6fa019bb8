# Static types for the compiled build of exchange.py (see setup.py).

cimport cython

from proxy.accesslog cimport AccessLog
from proxy.interfaces cimport ResponseSink
from proxy.observability cimport Observer
from proxy.request cimport Request
from proxy.server cimport ProxyServer
from proxy.service cimport Service
from proxy.upstream cimport UpstreamConnection
from proxy.websocket cimport WebSocketRelay


cdef class Exchange(ResponseSink):
    cdef public bint _active
    cdef public int _attempts
    cdef public object _body_buf
    cdef public Py_ssize_t _body_bytes
    cdef public bint _chunked
    cdef public object _connecting
    cdef public bytes _extra
    cdef public bytes _head
    cdef public object _intercept
    cdef public int _paused
    cdef public object _queue
    cdef public bint _req_done
    cdef public bint _response_started
    cdef public double _started
    cdef public int _status
    cdef public bint _tunnel
    cdef public object _up_out
    cdef public bint _upgrade
    cdef public bint _websocket
    cdef public bytes _xff_line
    cdef public object color
    cdef public double deadline
    cdef public object parser
    cdef public str peer
    cdef public int phase
    cdef public bytes proto_line
    cdef public Request req
    cdef public ProxyServer server
    cdef public Service service
    cdef public object settings
    cdef public object transport
    cdef public UpstreamConnection up
    cdef public object upstream
    cdef public WebSocketRelay ws
    cdef public Py_ssize_t _bytes_out
    cdef public str _client
    cdef public double _up_time
    cdef public object _reason
    cdef public bytes _rid
    cdef public object _span
    cdef public object _tls_version
    cdef public object _sni
    cdef public bytes _raw_head
    cdef public bytes _trace_in

    cdef _next_request(self)
    # Called by the upstream connection as the response arrives.
    cpdef response_head(self, conn, int status)
    cpdef bytes response_extra(self)
    cpdef upstream_activity(self)
    @cython.locals(up=UpstreamConnection)
    cpdef response_complete(self, conn, bint reusable)
    cpdef upstream_failed(self, conn, exc)
    cpdef start_tunnel(self, conn)
    cpdef tunnel_data(self, bytes data)
    cpdef tunnel_closed(self)
    cpdef pause_reading_for_upstream(self)
    cpdef resume_reading_for_upstream(self)
    cdef _pause(self, int flag)
    cdef _resume(self, int flag)
    cpdef write(self, bytes data)
    cpdef close(self)
    cdef _connect_and_send(self, upstream)
    cdef _attach(self, UpstreamConnection conn)
    cdef UpstreamConnection _detach(self)
    cdef _fail(self, exc)
    cpdef _reply(self, reply)
    @cython.locals(access=AccessLog, observer=Observer)
    cdef _end_exchange(self, bint aborted)
    @cython.locals(n=Py_ssize_t, headers=list, req=Request)
    cdef Py_ssize_t _head_size(self) except -1
    @cython.locals(end=double, service=Service, ws=WebSocketRelay, req=Request)
    cdef tuple _log_record(self, int status, observer)
    @cython.locals(end=double, service=Service, req=Request)
    cdef _log_request(self, AccessLog access, int status)
    cdef _flush_upstream(self, list out)
    cdef _to_upstream(self, bytes data)
