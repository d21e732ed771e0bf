"""A screenshot of the page at GET / for the README: a real `bentoml serve`, real test images, headless Chromium.

    python -m benchmarks.page_screenshot [--out benchmarks/results/page.png]

Chooses one CIFAR-10 test JPEG per class (upscaled to 128 x 128 PNGs so the thumbnails are visible; the service
brings them back to the model's 32 x 32), plus one file that is not an image, then waits for every answer.
"""

from __future__ import annotations

import argparse
import io
import tempfile
import time
from pathlib import Path

from PIL import Image
from selenium.webdriver.common.by import By

from benchmarks.browser import start_chromium
from bundle.class_tree import data_source, first_per_class
from serving.testing import ServedClassifier

REPO = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", default=str(data_source()))
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "page.png"))
    args = parser.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="page-"))
    files = []
    for entry in first_per_class(Path(args.data), "test", 1)[:5]:
        image = Image.open(io.BytesIO(entry.read())).resize((128, 128), Image.Resampling.NEAREST)
        path = work / f"{entry.label}.png"
        image.save(path)
        files.append(path)
    (work / "notes.png").write_text("this is not an image")
    files.append(work / "notes.png")

    with ServedClassifier(home=work / "home", log_path=work / "server.log") as served:
        served.wait_ready()
        browser = start_chromium(work / "profile")
        try:
            browser.set_window_size(1280, 1100)
            browser.get(f"{served.url}/")
            browser.find_element(By.ID, "files").send_keys("\n".join(str(f) for f in files))
            deadline = time.monotonic() + 60
            while browser.find_elements(By.CSS_SELECTOR, ".pending") and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(0.5)  # let the bars finish drawing
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(args.out)
        finally:
            browser.quit()
    print(f"saved {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
