"""The network model: per-node links whose capacity is shared max-min fairly between flows.

Every node has two links, its uplink and its downlink, each with a capacity in bytes per
second (what the emulated rollout shapes with two token buckets per host); the switch between
them is not a bottleneck. A :class:`Flow` is one direction of one connection (or one HTTP
transfer): it crosses the sender's uplink and the receiver's downlink and moves one item (a
block, a piece) at a time. While a flow has an item it is *active* and gets a rate; the rates
of the active flows are a max-min fair allocation (progressive filling, :func:`water_fill`):
no link carries more than its capacity, and no flow can get more without taking from a flow
that has no more than it. Propagation delay is not modelled here (the shell adds it to
deliveries).

Recomputing the exact allocation for every flow on every change costs O(flows) per change,
too much for thousands of nodes. So a change (a flow starts or stops) re-solves only its
neighbourhood: every flow on the two links it crosses is re-allocated, with the capacity the
other flows of their far-end links leave them (:meth:`Network._resolve_local`). That keeps
every link within its capacity and every flow that shares a link with the change fair; what
drifts (a far-end link whose share should shrink) is corrected the next time a change touches
that link and by an exact global solve every ``exact_interval`` virtual seconds
(:meth:`Network.resolve_all`). ``tests/unit/test_sim_network.py`` measures the difference.

A flow that keeps going from one item to the next (a writer with blocks queued) keeps its
rate: the set of active flows did not change, so neither did the allocation.
"""

from __future__ import annotations

import heapq
from collections.abc import Callable, Iterable

from tests.sim.loop import Loop

PROPAGATE = 2
"""Rings of far-end links a change re-solves beyond its own two links."""
FREED = 0.01
"""Capacity (fraction of a link's) that must come free on a far-end link to re-solve it."""


class Link:
    """One direction of one node's network interface."""

    __slots__ = ("alloc", "capacity", "carried", "flows", "index", "name")

    def __init__(self, index: int, capacity: float, name: str) -> None:
        if capacity <= 0:
            raise ValueError(f"link {name} needs a positive capacity")
        self.index = index
        self.capacity = capacity
        """Bytes per second."""
        self.name = name
        self.flows: dict[Flow, None] = {}
        """Active flows (insertion-ordered, so runs are deterministic)."""
        self.alloc = 0.0
        """Sum of the rates of the active flows."""
        self.carried = 0
        """Bytes carried so far (counted when an item completes)."""

    def __repr__(self) -> str:
        return f"<link {self.name} {len(self.flows)} flows>"


class Flow:
    """A sender's uplink to a receiver's downlink, one item at a time."""

    __slots__ = (
        "active",
        "deadline",
        "down",
        "item",
        "on_done",
        "rate",
        "remaining",
        "sent",
        "stamp",
        "up",
        "version",
    )

    def __init__(self, up: Link, down: Link, on_done: Callable[[Flow], object]) -> None:
        self.up = up
        self.down = down
        self.on_done = on_done
        """Called when the current item has gone through; it may :meth:`Network.send` the
        next one at once (the flow then stays active and keeps its rate)."""
        self.active = False
        self.rate = 0.0
        self.remaining = 0.0
        """Bytes of the current item left as of :attr:`stamp`."""
        self.stamp = 0.0
        self.item = 0
        """Size of the current item (0 when idle)."""
        self.version = 0
        """Bumped when a completion event is superseded (older ones are then stale)."""
        self.deadline: float | None = None
        """When the pending completion event fires (None: none pending). A rate that drops
        leaves it in place: it fires early, finds bytes left and schedules the rest."""
        self.sent = 0
        """Bytes of completed items."""


def water_fill(
    flows: Iterable[Flow], capacity: Callable[[Link, list[Flow]], float]
) -> dict[Flow, float]:
    """Max-min fair rates of ``flows`` by progressive filling.

    ``capacity(link, members)`` is what ``link`` can give to ``members`` (the flows of
    ``flows`` that cross it). The link with the smallest fair share (capacity over flows left)
    fixes the rate of its flows at that share; they leave the other link they cross, whose
    share can only grow; repeat. O(F log F)."""
    members = _members(flows)
    return _fill(members, {link: capacity(link, group) for link, group in members.items()})


def _members(flows: Iterable[Flow]) -> dict[Link, list[Flow]]:
    members: dict[Link, list[Flow]] = {}
    for flow in flows:
        for link in (flow.up, flow.down):
            group = members.get(link)
            if group is None:
                members[link] = [flow]
            else:
                group.append(flow)
    return members


def _fill(members: dict[Link, list[Flow]], avail: dict[Link, float]) -> dict[Flow, float]:
    count = {link: len(group) for link, group in members.items()}
    heap = [(avail[link] / n, link.index, n, link) for link, n in count.items()]
    heapq.heapify(heap)
    pop, push = heapq.heappop, heapq.heappush
    rates: dict[Flow, float] = {}
    while heap:
        share, _, seen, link = pop(heap)
        if count[link] != seen:
            continue  # stale: the link lost flows since (or is done)
        count[link] = 0
        if share < 0.0:
            share = 0.0
        for flow in members[link]:
            if flow in rates:
                continue
            rates[flow] = share
            other = flow.down if flow.up is link else flow.up
            left = count[other]
            if left:
                left -= 1
                room = avail[other] - share
                avail[other] = room
                count[other] = left
                if left:
                    push(heap, (room / left, other.index, left, other))
    return rates


class Network:
    def __init__(self, loop: Loop, *, exact_interval: float = 1.0) -> None:
        self.loop = loop
        self.links: list[Link] = []
        self.exact_interval = exact_interval
        """Virtual seconds between exact global solves (0: never)."""
        self.active = 0
        """Active flows."""
        self.resolves = 0
        self.resolved_flows = 0
        """Local solves so far and the flows they re-allocated (cost accounting)."""
        self._global_scheduled = False
        self._dirty: dict[Link, None] = {}
        """Links whose flows changed at this instant: re-solved together, once, before time
        moves on (many transfers start and end at the same instant)."""

    def link(self, capacity: float, name: str) -> Link:
        link = Link(len(self.links), capacity, name)
        self.links.append(link)
        return link

    def flow(self, up: Link, down: Link, on_done: Callable[[Flow], object]) -> Flow:
        return Flow(up, down, on_done)

    # -- items ---------------------------------------------------------------------------------

    def send(self, flow: Flow, size: int) -> None:
        """Start moving ``size`` bytes over ``flow`` (which must be idle)."""
        if flow.item:
            raise RuntimeError("the flow is still moving an item")
        now = self.loop.now
        flow.item = size
        flow.remaining = float(size)
        flow.stamp = now
        flow.deadline = None
        if flow.active:
            self._schedule(flow)
            return
        flow.active = True
        flow.rate = 0.0
        flow.up.flows[flow] = None
        flow.down.flows[flow] = None
        self.active += 1
        self._touch(flow)
        if self.exact_interval and not self._global_scheduled:
            self._global_scheduled = True
            self.loop.after(self.exact_interval, self._periodic)

    def cancel(self, flow: Flow) -> None:
        """Drop the item in progress (the connection ended)."""
        if flow.active:
            flow.item = 0
            self._deactivate(flow)

    def _schedule(self, flow: Flow) -> None:
        if flow.rate > 0:
            when = flow.stamp + flow.remaining / flow.rate
            if flow.deadline is None or when < flow.deadline:
                flow.version += 1
                flow.deadline = when
                self.loop.at(when, self._done, flow, flow.version)

    def _done(self, flow: Flow, version: int) -> None:
        if version != flow.version or not flow.active:
            return
        flow.deadline = None
        now = self.loop.now
        flow.remaining -= flow.rate * (now - flow.stamp)
        flow.stamp = now
        if flow.remaining > 1.0:  # the rate dropped since this event was set: not yet
            self._schedule(flow)
            return
        size = flow.item
        flow.item = 0
        flow.remaining = 0.0
        flow.sent += size
        flow.up.carried += size
        flow.down.carried += size
        flow.on_done(flow)
        if not flow.item and flow.active:
            self._deactivate(flow)

    def _deactivate(self, flow: Flow) -> None:
        flow.active = False
        del flow.up.flows[flow]
        del flow.down.flows[flow]
        flow.up.alloc -= flow.rate
        flow.down.alloc -= flow.rate
        flow.rate = 0.0
        flow.version += 1
        flow.deadline = None
        self.active -= 1
        self._touch(flow)

    # -- allocation ----------------------------------------------------------------------------

    def _touch(self, flow: Flow) -> None:
        dirty = self._dirty
        if not dirty:
            self.loop.soon(self._resolve_dirty, 0)
        dirty[flow.up] = None
        dirty[flow.down] = None

    def _resolve_dirty(self, depth: int) -> None:
        links, self._dirty = self._dirty, {}
        freed = self._resolve_local(links)
        if freed and depth < PROPAGATE:
            # Capacity freed on far-end links goes to their other flows (one more ring).
            if not self._dirty:
                self.loop.soon(self._resolve_dirty, depth + 1)
            self._dirty.update(freed)

    def _resolve_local(self, links: dict[Link, None]) -> dict[Link, None]:
        """Re-allocate every flow on ``links``; returns the far-end links on which they now
        take noticeably less, if other flows there could use it."""
        free: dict[Flow, None] = {}
        for link in links:
            free.update(link.flows)
        if not free:
            return {}
        self.resolves += 1
        self.resolved_flows += len(free)
        members = _members(free)
        avail = {}
        for link, group in members.items():
            # What the flows not being re-allocated leave on this link.
            held = 0.0
            for flow in group:
                held += flow.rate
            avail[link] = link.capacity - link.alloc + held
        rates = _fill(members, avail)
        freed: dict[Link, None] = {}
        for link, group in members.items():
            if link in links or len(group) == len(link.flows):
                continue
            drop = 0.0
            for flow in group:
                drop += flow.rate - rates[flow]
            if drop > FREED * link.capacity:
                freed[link] = None
        self._apply(rates)
        return freed

    def resolve_all(self) -> None:
        """The exact max-min allocation of every active flow."""
        flows: dict[Flow, None] = {}
        for link in self.links:
            if link.flows:
                flows.update(link.flows)
                link.alloc = sum(f.rate for f in link.flows)  # no drift from many updates
        if flows:
            self._apply(water_fill(flows, lambda link, _members: link.capacity))

    def _periodic(self) -> None:
        self._global_scheduled = False
        if self.active:
            self.resolve_all()
            self._global_scheduled = True
            self.loop.after(self.exact_interval, self._periodic)

    def _apply(self, rates: dict[Flow, float]) -> None:
        now = self.loop.now
        for flow, rate in rates.items():
            old = flow.rate
            if abs(rate - old) <= 1e-9 * max(rate, old):
                continue
            if old:
                flow.remaining -= old * (now - flow.stamp)
            flow.stamp = now
            delta = rate - old
            flow.up.alloc += delta
            flow.down.alloc += delta
            flow.rate = rate
            if flow.item:
                self._schedule(flow)
