"""p2p-tracker: a BitTorrent HTTP tracker (BEP 3, BEP 23, BEP 7) that keeps peers in memory."""

__version__ = "0.1.0"
