"""p2p-proxy: the raw seed. Fetches each blob from the origin once, seeds it over BitTorrent."""

__version__ = "0.1.0"
