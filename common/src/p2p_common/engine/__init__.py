"""The peer engine: the trio shell around the pure BitTorrent cores."""

from p2p_common.engine.engine import Engine, EngineStoppedError, make_peer_id
from p2p_common.engine.torrent import Torrent, TorrentFailedError

__all__ = ["Engine", "EngineStoppedError", "Torrent", "TorrentFailedError", "make_peer_id"]
