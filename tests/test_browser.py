"""The web page in headless Chromium (Debian's chromium + chromium-driver; `make browser-deps` installs them).

Not skipped when Chromium is missing: the test fails and says how to install it. Screenshots are written
to ``artifacts/browser/`` (override with ``$JFE_ARTIFACTS``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

from jfe.indexing import build_index
from jfe.models.toy import ToyEncoder
from jfe.serve.app import create_app
from jfe.serve.sample import build_sample_dataset
from jfe.serve.schemas import ServeSettings
from jfe.serve.server import BackgroundServer

pytestmark = pytest.mark.browser

ARTIFACTS = Path(os.environ.get("JFE_ARTIFACTS", Path(__file__).resolve().parents[1] / "artifacts")) / "browser"
CHROMIUM_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--window-size=1280,1000")


def find_binary(*names: str) -> str:
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    pytest.fail(f"{' / '.join(names)} not found: the browser test needs Debian's chromium and chromium-driver "
                "(run `make browser-deps`, i.e. apt-get install -y chromium chromium-driver)")


@pytest.fixture
def driver():
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = find_binary("chromium", "chromium-browser")
    profile = tempfile.mkdtemp(prefix="jfe-chromium-")
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={profile}"):
        options.add_argument(flag)
    browser = webdriver.Chrome(service=Service(find_binary("chromedriver")), options=options)
    browser.set_page_load_timeout(30)
    try:
        yield browser
    finally:
        browser.quit()
        shutil.rmtree(profile, ignore_errors=True)


@pytest.fixture
def server(tmp_path: Path):
    root = build_sample_dataset(tmp_path / "sample")
    model = ToyEncoder()
    index = build_index(model, sorted((root / "cand_pool" / "local").glob("*.jsonl")), root, progress=False)
    with BackgroundServer(create_app(model, index, ServeSettings(model_name="toy-hash"))) as running:
        running.root = root
        yield running


def wait_for_results(driver, searches: int) -> list:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(driver, 20).until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-searches")
                                    == str(searches))
    # Thumbnails load after the grid appears; wait until every image has decoded.
    WebDriverWait(driver, 20).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('#results img')].every(i => i.complete && i.naturalWidth > 0)"))
    return driver.find_elements(By.CSS_SELECTOR, "#results .card")


def test_page_text_and_image_search(driver, server) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    driver.get(server.url + "/")
    assert driver.title == "JFE search"
    WebDriverWait(driver, 20).until(lambda d: "candidates" in d.find_element(By.ID, "service").text)
    assert "72 candidates" in driver.find_element(By.ID, "service").text
    # The instruction select is filled from /instructions.
    WebDriverWait(driver, 20).until(lambda d: len(Select(d.find_element(By.ID, "instruction")).options) > 1)
    options = [o.text for o in Select(driver.find_element(By.ID, "instruction")).options]
    assert "Find the picture this text describes" in options

    # 1. a text query
    driver.find_element(By.ID, "text").send_keys("a green triangle")
    k = driver.find_element(By.ID, "k")
    k.clear()
    k.send_keys("8")
    driver.find_element(By.ID, "submit").click()
    cards = wait_for_results(driver, 1)
    assert len(cards) == 8
    first = cards[0].text
    assert "#1" in first and "a green triangle" in first
    assert "text query" in driver.find_element(By.ID, "status").text
    driver.save_screenshot(str(ARTIFACTS / "text_query.png"))

    # 2. an image query (file picker), with an instruction
    driver.find_element(By.ID, "text").clear()
    picker = driver.find_element(By.ID, "file")
    driver.execute_script("arguments[0].hidden = false;", picker)
    picker.send_keys(str(server.root / "images/sample/blue_circle.png"))
    driver.execute_script("arguments[0].hidden = true;", picker)  # as a user sees it: drop zone only
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.ID, "preview").is_displayed())
    Select(driver.find_element(By.ID, "instruction")).select_by_visible_text("Find a similar picture")
    driver.find_element(By.ID, "submit").click()
    cards = wait_for_results(driver, 2)
    assert len(cards) == 8
    assert "image query" in driver.find_element(By.ID, "status").text
    thumbs = driver.find_elements(By.CSS_SELECTOR, "#results img")
    assert thumbs and all(int(t.get_attribute("naturalWidth")) > 0 for t in thumbs)
    driver.save_screenshot(str(ARTIFACTS / "image_query.png"))

    # 3. the same image plus text
    driver.find_element(By.ID, "text").send_keys("make it red")
    driver.find_element(By.ID, "submit").click()
    wait_for_results(driver, 3)
    assert "image,text query" in driver.find_element(By.ID, "status").text
    driver.save_screenshot(str(ARTIFACTS / "image_text_query.png"))
    assert (ARTIFACTS / "image_query.png").stat().st_size > 10_000


def test_page_shows_server_errors(driver, server) -> None:  # noqa: ANN001
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(server.url + "/")
    driver.find_element(By.ID, "submit").click()  # nothing entered: the page says so without a request
    status = driver.find_element(By.ID, "status")
    assert "error" in status.get_attribute("class") and status.text
    driver.find_element(By.ID, "text").send_keys("x")
    # Past the form's own max: the server's 422 message must reach the status line.
    driver.execute_script("const k = document.getElementById('k'); k.removeAttribute('max'); k.value = '500';")
    driver.find_element(By.ID, "submit").click()
    WebDriverWait(driver, 10).until(lambda d: "k:" in d.find_element(By.ID, "status").text)


def test_page_reranks_and_shows_where_each_hit_came_from(driver, tmp_path: Path) -> None:  # noqa: ANN001
    import torch
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select, WebDriverWait

    from jfe.models.rerankers import JointRerankConfig, JointReranker

    root = build_sample_dataset(tmp_path / "sample")
    model = ToyEncoder()
    index = build_index(model, sorted((root / "cand_pool" / "local").glob("*.jsonl")), root, progress=False,
                        model_name="toy")
    reranker = JointReranker(JointRerankConfig(grid=2, retriever="toy")).eval()
    with torch.no_grad():
        reranker.head[-1].weight.normal_(0, 1.0, generator=torch.Generator().manual_seed(0))  # type: ignore[operator]
    app = create_app(model, index, ServeSettings(model_name="toy"), {"jfe-mini-rerank": reranker})
    with BackgroundServer(app) as running:
        driver.get(running.url + "/")
        WebDriverWait(driver, 20).until(lambda d: d.find_element(By.ID, "rerank-field").is_displayed())
        Select(driver.find_element(By.ID, "rerank")).select_by_visible_text("jfe-mini-rerank")
        driver.find_element(By.ID, "text").send_keys("a green triangle")
        driver.find_element(By.ID, "submit").click()
        cards = wait_for_results(driver, 1)
        assert len(cards) == 12
        assert "reranked by jfe-mini-rerank" in driver.find_element(By.ID, "status").text
        badges = [c.find_element(By.CSS_SELECTOR, ".was").text for c in cards]
        assert all(b == "=" or b.startswith("was #") for b in badges) and any(b.startswith("was #") for b in badges)
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(ARTIFACTS / "reranked_query.png"))
