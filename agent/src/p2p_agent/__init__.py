"""p2p-agent: the node's registry mirror on localhost:5004, fed over BitTorrent."""

__version__ = "0.1.0"
