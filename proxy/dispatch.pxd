# Static types for the compiled build of dispatch.py (see setup.py).

cimport cython

from proxy.exchange cimport Exchange
from proxy.request cimport Request, read_head, upstream_head
from proxy.hosts cimport ServiceTable
from proxy.pools cimport Pool
from proxy.service cimport Service
from proxy.router cimport Decision, cookie_bucket, route


cdef class Dispatcher(Exchange):
    @cython.locals(table=ServiceTable)
    cdef Service _match_service(self, bytes host, bytes url)
    @cython.locals(http11=bint)
    cdef _dispatch(self, Request req)
    @cython.locals(is_upgrade=bint, service=Service, value=bytes, override=bytes, sticky=bytes,
                   token=bytes, cl=bytes, roll=double,
                   decision=Decision, pool=Pool)
    cdef _route_and_send(self, Request req, bint upgrade)
    cdef _take_observed(self, Request req, observer, bint trusted)
    cdef _observe(self, observer, Request req)
