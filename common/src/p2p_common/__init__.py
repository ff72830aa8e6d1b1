"""p2p_common: the library shared by p2p-agent, p2p-proxy and p2p-tracker.

Pure protocol cores (no trio, no sockets, no clock) live in plain modules:
``bencoding``, ``metainfo``, ``wire``, ``tracker_proto``, ``picker``, ``choker``,
``bitfield``, ``ratelimit``, ``ttlcache``. The trio shells that drive them live in ``engine``;
``singleflight`` shares one run of work among concurrent callers.
"""

__version__ = "0.1.0"
