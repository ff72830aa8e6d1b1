"""A discrete-event swarm simulator that drives the project's own pure cores.

``python -m tests.sim --nodes N --size-mb S --layers L --rate MBIT ...`` (see
:mod:`tests.sim.__main__` and docs/scale.md). Virtual time, no sockets, no trio: the peer
sessions (:class:`p2p_common.session.PeerSession`), the per-torrent cores
(:class:`p2p_common.swarm.SwarmCore`, with the picker, the choker and super-seeding) and the
tracker's core (:class:`p2p_tracker.swarm.Swarm`) run unchanged; this package is only the shell
around them (what ``p2p_common.engine`` does with trio, done in virtual time) and a network
model (:mod:`tests.sim.network`: per-node upload and download capacity shared max-min fairly
between the transfers that use it, plus a propagation delay).

Modules: :mod:`~tests.sim.loop` (the event heap), :mod:`~tests.sim.network` (links, flows,
fair shares), :mod:`~tests.sim.peers` (processes, torrents, connections: the engine's shell),
:mod:`~tests.sim.scenario` (origin, proxies, tracker, pull clients, results).
"""
