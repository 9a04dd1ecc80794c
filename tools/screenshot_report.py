"""The picture of the HTML report in the README and docs (docs/img/report.png): the top of a
report page in headless Chromium, at a laptop width.

    python tools/screenshot_report.py refract-report.html docs/img/report.png [--size 1200x1000]

Needs selenium (the test extra) and Debian's chromium and chromium-driver, as tests/test_html.py
does. Take it from a real run of README command 1."""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("html", type=Path)
    ap.add_argument("png", type=Path)
    ap.add_argument("--size", default="1200x1000", help="window WIDTHxHEIGHT in CSS pixels")
    args = ap.parse_args()
    width, height = (int(x) for x in args.size.split("x"))

    from selenium import webdriver
    from selenium.webdriver.chrome.options import Options
    from selenium.webdriver.chrome.service import Service

    options = Options()
    with tempfile.TemporaryDirectory() as profile:
        for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                    "--disable-background-networking", "--disable-component-update", "--disable-sync",
                    f"--user-data-dir={profile}", "--force-device-scale-factor=1", "--hide-scrollbars"):
            options.add_argument(arg)
        options.binary_location = "/usr/bin/chromium"
        driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=options)
        try:
            driver.set_window_size(width, height)
            driver.get(args.html.resolve().as_uri())
            driver.save_screenshot(str(args.png))
        finally:
            driver.quit()


if __name__ == "__main__":
    main()
