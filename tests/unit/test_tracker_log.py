"""The announce outcomes the engine keeps per tracker instance for status views
(p2p_common.engine.tracker_log.TrackerLog): bounded, and free of secrets."""

from __future__ import annotations

import httpx

from p2p_common.engine.tracker_log import TrackerLog, redact_url
from p2p_common.tracker_proto import AnnounceResponse, TrackerRefusedError


def test_the_log_keeps_the_most_recently_used_trackers() -> None:
    log = TrackerLog(keep=2)
    answer = AnnounceResponse(interval=60)
    log.answered("http://10.0.0.1/announce", "http://t/announce", answer)
    log.answered("http://10.0.0.2/announce", "http://t/announce", answer)
    log.answered("http://10.0.0.1/announce", "http://t/announce", answer)  # used again
    log.failed("http://10.0.0.3/announce", "http://t/announce", OSError("unreachable"))
    instances = log.snapshot()["instances"]
    assert [i["url"] for i in instances] == ["http://10.0.0.3/announce", "http://10.0.0.1/announce"]
    assert instances[1]["answers"] == 2


def test_a_tracker_that_answers_again_after_failing_is_ok() -> None:
    now = [100.0]
    log = TrackerLog(wall=lambda: now[0])
    url = "udp://10.0.0.1:6969"
    log.failed(url, url, TrackerRefusedError("unregistered torrent"))
    (entry,) = log.snapshot()["instances"]
    assert (entry["ok"], entry["last_error"], entry["last_answer_at"]) == (
        False,
        "tracker refused: unregistered torrent",
        None,
    )
    now[0] = 101.0
    log.answered(url, url, AnnounceResponse(interval=60, warning="slow down"))
    (entry,) = log.snapshot()["instances"]
    assert (entry["ok"], entry["failures"], entry["answers"], entry["warning"]) == (
        True,
        1,
        1,
        "slow down",
    )
    assert entry["last_error"] == "tracker refused: unregistered torrent"  # kept for the record


def test_urls_and_errors_shown_carry_no_secret() -> None:
    assert redact_url("http://u:p@t.example:6969/announce?passkey=x") == (
        "http://t.example:6969/announce?..."
    )
    assert redact_url("udp://t.example:6969") == "udp://t.example:6969"
    log = TrackerLog()
    request = httpx.Request("GET", "http://t/announce?info_hash=%01%02&peer_id=-PA0100-abc")
    log.failed("http://t/announce", "http://t/announce", httpx.ConnectError(str(request.url)))
    log.failed("http://t2/announce", "http://t2/announce", OSError("x" * 1000))
    first, second = log.snapshot(["http://u:p@t/announce"])["instances"][::-1]
    assert first["last_error"] == "ConnectError"  # the message quoted the announce URL
    assert len(second["last_error"]) == 200
    assert log.snapshot(["http://u:p@t/announce"])["listed"] == ["http://t/announce"]
