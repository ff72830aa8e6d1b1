"""The agent's status page in a real browser (Debian's chromium, headless, driven by selenium):
the script polls ``/status`` and fills the page, as an operator sees it through
``kubectl port-forward``."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
from selenium import webdriver
from selenium.webdriver.chrome.service import Service as ChromeService
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.cluster import origin_with_image, run_agent, run_proxy, run_tracker
from tests.realparts import images
from tests.realparts.registry import Registry

pytestmark = pytest.mark.realparts

MiB = 1024 * 1024


@pytest.fixture(scope="module")
def origin(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Registry, images.Image]]:
    with origin_with_image(
        tmp_path_factory.mktemp("status-page"),
        repository="team/page",
        seed="page",
        tag="1.0",
        layer_sizes=(3 * MiB,),
    ) as origin:
        yield origin


def browser() -> webdriver.Chrome:
    chromium = shutil.which("chromium")
    driver = shutil.which("chromedriver")
    assert chromium, "tests/install-real-parts.sh installs chromium"
    assert driver, "tests/install-real-parts.sh installs chromium-driver"
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    return webdriver.Chrome(service=ChromeService(executable_path=driver), options=options)


def read_page(url: str, digest: str) -> dict[str, str]:
    """Open the page, wait until its script has shown the pull, return what it shows."""
    driver = browser()
    try:
        driver.get(url)
        short = digest[7:19]

        def shown(_: object) -> bool:
            rows = driver.find_elements(By.CSS_SELECTOR, "#recent tbody tr")
            trackers = driver.find_element(By.CSS_SELECTOR, "#trackers tbody").text
            return "answering" in trackers and any(
                short in row.text and "done" in row.text for row in rows
            )

        WebDriverWait(driver, 30, poll_frequency=0.2).until(shown)
        return {
            "title": driver.title,
            "recent": driver.find_element(By.CSS_SELECTOR, "#recent tbody").text,
            "pulls": driver.find_element(By.CSS_SELECTOR, "#pulls tbody").text,
            "proxies": driver.find_element(By.CSS_SELECTOR, "#proxies tbody").text,
            "trackers": driver.find_element(By.CSS_SELECTOR, "#trackers tbody").text,
            "mirror": driver.find_element(By.CSS_SELECTOR, "#mirror tbody").text,
            "cache": driver.find_element(By.ID, "cache-detail").text,
            "rates": driver.find_element(By.ID, "rates").text,
            "last": driver.find_element(By.ID, "last-pull").text,
            "state": driver.find_element(By.ID, "state").get_attribute("class") or "",
        }
    finally:
        driver.quit()


async def test_the_status_page_shows_a_finished_pull_in_a_browser(
    origin: tuple[Registry, images.Image], tmp_path: Path
) -> None:
    registry, image = origin
    layer = image.layers[0]
    # What the chart's mirror-config container leaves for the agent: its verdict on
    # containerd's config and the catch-all's hosts.toml (none for the registry itself).
    state = tmp_path / "mirror-state"
    (state / "_default").mkdir(parents=True)
    (state / "_default" / "hosts.toml").write_text('[host."http://127.0.0.1:5004"]\n')
    (state / "containerd.json").write_text(
        '{"state": "unset", "message": "containerd ignores hosts.toml files: fix it"}'
    )
    async with (
        run_tracker() as announce,
        run_proxy(tmp_path / "proxy", [registry.url], [announce]) as proxy,
        run_agent(
            tmp_path / "agent",
            [registry.url],
            [proxy.url],
            download_rate=0,
            mirror_config_path=state,
        ) as agent,
    ):
        response = await agent.http.get(f"/v2/team/page/blobs/{layer.digest}")
        assert response.content == layer.data
        url = str(agent.status.base_url).rstrip("/") + "/"
        seen = await trio.to_thread.run_sync(read_page, url, layer.digest)
    assert seen["title"] == "p2p agent"
    assert "team/page" in seen["recent"]
    assert "download" in seen["recent"]
    assert seen["pulls"] == "no pull in flight"
    assert "answering" in seen["proxies"]
    assert announce in seen["trackers"]  # the tracker the proxy put into the metainfo
    assert registry.host in seen["mirror"]
    assert "missing" in seen["mirror"]  # no hosts.toml for the registry
    assert "containerd unset containerd ignores hosts.toml files: fix it" in seen["mirror"]
    assert "(every other registry)" in seen["mirror"]
    assert "blobs" in seen["cache"]
    assert seen["rates"] == "unlimited / unlimited"
    assert seen["last"].endswith("s ago")
    assert "bad" not in seen["state"]  # the page reached /status
