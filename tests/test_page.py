"""The page at GET / in a real headless Chromium, served by a real `bentoml serve` of the bundled model.

The page shows the model (name, classes, test accuracy from GET /model); a real CIFAR-10 test image chosen in
its file input comes back with the top label the offline predictor gives the same bytes, drawn as bars; a file
the service refuses shows the service's own 4xx message. Chromium comes from scripts/install-browser.sh
(`make test` runs it). Run: `pytest tests/test_page.py`.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from helpers import ServedClassifier, read_test_images
from selenium.webdriver.common.by import By
from selenium.webdriver.support import expected_conditions
from selenium.webdriver.support.ui import WebDriverWait

from benchmarks.browser import find_chromium, start_chromium
from bundle.manifest import load_model_dir
from bundle.runtime import resolve_backend
from serving.classifier import Classifier
from serving.predict import predict_stream

pytestmark = pytest.mark.slow
WAIT = 60  # seconds for anything the page does


@pytest.fixture(scope="module")
def page(default_model: Path, tmp_path_factory: pytest.TempPathFactory):
    """(browser at GET /, served URL); the browser and the server end with the module."""
    if find_chromium() is None:
        pytest.fail("Chromium/ChromeDriver missing: run scripts/install-browser.sh (make test does)")
    folder = tmp_path_factory.mktemp("page")
    with ServedClassifier(
        "--arg", f"model={default_model}", home=folder / "home", log_path=folder / "server.log"
    ) as served:
        served.wait_ready()
        browser = start_chromium(folder / "profile")
        try:
            browser.get(f"{served.url}/")
            yield browser, served
        finally:
            browser.quit()


def _wait(browser, condition, what: str):
    return WebDriverWait(browser, WAIT).until(condition, message=f"the page never showed {what}")


def test_page_shows_the_model_from_its_manifest(page, default_model: Path) -> None:
    browser, _ = page
    model = load_model_dir(default_model)
    summary = _wait(
        browser,
        lambda b: (e := b.find_element(By.ID, "model-summary")).text.startswith("Model ") and e,
        "the model summary",
    )
    accuracy = model.manifest["test_accuracy"][resolve_backend(model)]  # the backend the service runs
    assert model.name in summary.text and f"{100 * accuracy:.2f}% test accuracy" in summary.text, summary.text
    classes = browser.find_element(By.ID, "model-classes").text
    assert all(name in classes for name in model.class_names), classes


def test_page_classifies_a_chosen_image_like_the_offline_predictor(
    page, default_model: Path, shared_archive: Path, tmp_path: Path
) -> None:
    browser, _ = page
    name, label, data = read_test_images(shared_archive, per_class=1)[8]  # a ship
    path = tmp_path / Path(name).name
    path.write_bytes(data)
    model = load_model_dir(default_model)
    ((_, probabilities, _),) = predict_stream(Classifier.load(model.folder, threads=1), [(path.name, data)], 1, 1)
    expected = model.class_names[int(probabilities.argmax())]

    browser.find_element(By.ID, "files").send_keys(str(path))
    card = f'.result[data-file="{path.name}"]'
    top = _wait(
        browser, expected_conditions.presence_of_element_located((By.CSS_SELECTOR, f"{card} .top-label")), "a top label"
    )
    assert top.text == expected, (top.text, expected, label)
    bars = browser.find_elements(By.CSS_SELECTOR, f"{card} .bar")
    assert len(bars) == 5  # the five most probable classes, as bars with percentages
    first = bars[0].find_element(By.CSS_SELECTOR, ".pct").text
    assert first == f"{100 * probabilities.max():.1f}%", (first, probabilities.max())
    assert browser.find_element(By.CSS_SELECTOR, f"{card} img").get_attribute("src").startswith("blob:")


def test_page_shows_why_a_file_was_refused(page, tmp_path: Path) -> None:
    browser, _ = page
    path = tmp_path / "not-an-image.png"
    path.write_text("this is not an image")
    browser.find_element(By.ID, "files").send_keys(str(path))
    error = _wait(
        browser,
        expected_conditions.presence_of_element_located((By.CSS_SELECTOR, f'.result[data-file="{path.name}"] .error')),
        "the refusal",
    )
    assert "Refused (400)" in error.text and "not a recognised image format" in error.text, error.text
