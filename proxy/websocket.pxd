# Static types for the compiled build of websocket.py (see setup.py).

cimport cython

from proxy.interfaces cimport ResponseSink
from proxy.upstream cimport UpstreamConnection



cdef class FrameTracker:
    # Not a C integer: a frame may announce a length no C integer holds.
    cdef public object _remaining
    cdef public bytes _hdr
    cdef public Py_ssize_t _want
    cdef public bint in_message
    cdef public bint close_seen
    cdef public Py_ssize_t messages

    @cython.locals(n=Py_ssize_t, b0=int, b1=int, ln=Py_ssize_t, opcode=int, pos=Py_ssize_t,
                   need=Py_ssize_t, take=Py_ssize_t)
    cpdef Py_ssize_t feed(self, bytes data, bint want_boundary=*) except? -2
    @cython.locals(hdr=bytes, b0=int, b1=int, opcode=int)
    cdef bint _frame_started(self) except -1


cdef class WebSocketRelay:
    cdef public bint _done
    cdef public list _pending
    cdef public ResponseSink client
    cdef public double close_deadline
    cdef public bint closing
    cdef public FrameTracker down
    cdef public str ended_by
    cdef public bint reconnect_sent
    cdef public FrameTracker up
    cdef public UpstreamConnection upstream

    @cython.locals(off=Py_ssize_t, down=FrameTracker)
    cpdef from_upstream(self, bytes data)
    @cython.locals(up=FrameTracker)
    cpdef from_client(self, bytes data)
