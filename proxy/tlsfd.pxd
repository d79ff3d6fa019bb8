# Static types for the compiled build of tlsfd.py (see setup.py).

cdef int _READ, _HIGH_WATER, _LOW_WATER


cdef class TlsSocketTransport:
    cdef object __weakref__  # Cython allows it no "public"
    cdef public object _loop
    cdef public object _sock
    cdef public int _fd
    cdef public object _peer
    cdef public object _factory
    cdef public object _owner
    cdef public object _protocol
    cdef public list _queue
    cdef public Py_ssize_t _queued
    cdef public bint _reading
    cdef public bint _paused_reading
    cdef public bint _eof
    cdef public bint _writing_paused
    cdef public bint _closing
    cdef public bint _closed
    cdef public object bg_server_name
    cdef public object _sslobj

    cdef _handshake(self)
    cdef _shake_on(self, bint readable)
    cdef _start_reading(self)
    cdef _stop_reading(self)
    cdef _shutdown(self)
    cdef _fatal(self, exc)
    cdef _teardown(self, exc)
