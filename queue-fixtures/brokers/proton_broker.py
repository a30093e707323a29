#!/usr/bin/python3
"""A minimal AMQP 1.0 queue broker on Qpid Proton's reactor, for the driver's tests.

Qpid Proton's example broker (Debian's libqpid-proton11-dev-examples) loses released
deliveries and those of a consumer that goes away, so the conformance suite cannot run
on it. This one keeps the same shape (a queue per address, created on first attach,
competing consumers by link credit) and adds what a queue broker must do: a released
or modified delivery goes back to the front of its queue, and so does everything a
consumer held unsettled when its link, session or connection ends. Messages are kept
as the bytes the publisher sent, so nothing is re-encoded on the way through.

Usage: proton_broker.py PORT [--presettle-when-allowed]   (listens on 127.0.0.1:PORT,
ANONYMOUS login; prints "ready" on stdout once listening). With
--presettle-when-allowed, a consumer whose attach allows settled deliveries (its
snd-settle-mode is `mixed`, the default, or `settled`) gets every delivery settled:
gone from the queue as it is sent, as AMQP 1.0 lets a sender do then.
"""

import collections
import sys

from proton import Delivery, Endpoint, Handler, Link
from proton.reactor import Container

ACTIVE = Endpoint.REMOTE_ACTIVE
PUBLISH_CREDIT = 1000


class Queue:
    def __init__(self):
        self.messages = collections.deque()
        self.consumers = []
        self.next_consumer = 0

    def dispatch(self):
        # Round robin over consumers with credit.
        while self.messages and self.consumers:
            ready = [c for c in self.consumers if c.credit > 0]
            if not ready:
                return
            consumer = ready[self.next_consumer % len(ready)]
            self.next_consumer += 1
            data = self.messages.popleft()
            tag = str(consumer.broker_tag)
            consumer.broker_tag += 1
            dlv = consumer.delivery(tag)
            consumer.stream(data)
            consumer.advance()
            if consumer.broker_presettled:
                dlv.settle()
            else:
                consumer.broker_unsettled[dlv] = data


class Broker(Handler):
    def __init__(self, port, presettle_when_allowed):
        super().__init__()
        self.port = port
        self.presettle_when_allowed = presettle_when_allowed
        self.queues = {}

    def queue(self, address):
        if address not in self.queues:
            self.queues[address] = Queue()
        return self.queues[address]

    def on_reactor_init(self, event):
        event.container.listen("127.0.0.1:%d" % self.port)
        print("ready", flush=True)

    def on_connection_remote_open(self, event):
        if event.connection.state & Endpoint.LOCAL_UNINIT:
            event.connection.open()

    def on_session_remote_open(self, event):
        if event.session.state & Endpoint.LOCAL_UNINIT:
            event.session.open()

    def on_link_remote_open(self, event):
        link = event.link
        if not link.state & Endpoint.LOCAL_UNINIT:
            return
        if link.is_sender:
            address = link.remote_source.address
            link.source.address = address
            link.target.copy(link.remote_target)
            link.broker_queue = address
            link.broker_tag = 0
            link.broker_unsettled = {}
            link.broker_presettled = (
                self.presettle_when_allowed
                and link.remote_snd_settle_mode != Link.SND_UNSETTLED
            )
            if link.broker_presettled:
                link.snd_settle_mode = Link.SND_SETTLED
            link.open()
            queue = self.queue(address)
            queue.consumers.append(link)
            queue.dispatch()
        else:
            address = link.remote_target.address
            link.target.address = address
            link.source.copy(link.remote_source)
            link.broker_queue = address
            self.queue(address)
            link.open()
            link.flow(PUBLISH_CREDIT)

    def forget(self, link):
        """A consumer link ends: everything it held goes back, in order, in front."""
        address = getattr(link, "broker_queue", None)
        if address is None or not link.is_sender:
            return
        queue = self.queue(address)
        if link in queue.consumers:
            queue.consumers.remove(link)
        held = list(link.broker_unsettled.values())
        link.broker_unsettled.clear()
        for data in reversed(held):
            queue.messages.appendleft(data)
        link.broker_queue = None
        queue.dispatch()

    def on_link_remote_close(self, event):
        self.forget(event.link)
        event.link.close()

    def on_link_remote_detach(self, event):
        self.forget(event.link)
        event.link.detach()

    def forget_session(self, session):
        link = session.connection.link_head(0)
        while link:
            if link.session == session:
                self.forget(link)
            link = link.next(0)

    def on_session_remote_close(self, event):
        self.forget_session(event.session)
        event.session.close()

    def forget_connection(self, connection):
        link = connection.link_head(0)
        while link:
            self.forget(link)
            link = link.next(0)

    def on_connection_remote_close(self, event):
        self.forget_connection(event.connection)
        event.connection.close()

    def on_transport_closed(self, event):
        if event.connection is not None:
            self.forget_connection(event.connection)

    def on_link_flow(self, event):
        link = event.link
        if link.is_sender and getattr(link, "broker_queue", None) is not None:
            self.queue(link.broker_queue).dispatch()

    def on_delivery(self, event):
        dlv = event.delivery
        link = dlv.link
        if link.is_receiver:
            if not dlv.readable or dlv.partial:
                return
            data = link.recv(dlv.pending)
            link.advance()
            dlv.update(Delivery.ACCEPTED)
            dlv.settle()
            queue = self.queue(link.broker_queue)
            queue.messages.append(data)
            queue.dispatch()
            if link.credit < PUBLISH_CREDIT // 2:
                link.flow(PUBLISH_CREDIT - link.credit)
            return
        # An outcome from a consumer.
        if not (dlv.updated or dlv.remote_settled):
            return
        state = dlv.remote_state
        data = link.broker_unsettled.pop(dlv, None) if hasattr(link, "broker_unsettled") else None
        if data is not None and state in (Delivery.RELEASED, Delivery.MODIFIED):
            queue = self.queue(link.broker_queue)
            queue.messages.appendleft(data)
        dlv.settle()
        if getattr(link, "broker_queue", None) is not None:
            self.queue(link.broker_queue).dispatch()


if __name__ == "__main__":
    Container(Broker(int(sys.argv[1]), "--presettle-when-allowed" in sys.argv[2:])).run()
