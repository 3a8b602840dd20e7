"""Takes docs/rating_page.png: rate_dataset.py's study page, as a rater sees it, in headless chromium.

    python docs/rating_page_screenshot.py --dataset digits --synthetic_dir Data/Synthetic/Exp_0/digits

The study is served in this process with the page's defaults, its answers kept in a temporary folder
(nothing is answered); needs chromium, chromedriver (Debian: apt-get install chromium chromium-driver)
and Selenium (requirements-dev.txt).
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from Pipeline.rating import AnswerStore, RatingSettings, Study, StudyServer, create_app  # noqa: E402
from Utils.cli import ArgumentParser, UserError, existing_folder, positive_int, run_cli  # noqa: E402


def main(argv=None):
    parser = ArgumentParser(description=__doc__)
    parser.add_argument("--dataset", required=True)
    parser.add_argument("--synthetic_dir", required=True, type=existing_folder)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parent / "rating_page.png"))
    parser.add_argument("--width", type=positive_int, default=1000)
    parser.add_argument("--height", type=positive_int, default=800)
    args = parser.parse_args(argv)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not chromium or not driver:
        raise UserError("needs chromium and chromedriver (apt-get install chromium chromium-driver)")
    from selenium import webdriver
    from selenium.webdriver.support.ui import WebDriverWait

    with tempfile.TemporaryDirectory() as ratings:
        settings = RatingSettings(dataset=args.dataset, synthetic_dir=args.synthetic_dir, ratings_dir=ratings, port=0)
        study = Study(settings)
        study.write_description()
        server = StudyServer(create_app(study, AnswerStore(study.directory), log=lambda *_: None),
                             "127.0.0.1", 0).start()
        options = webdriver.ChromeOptions()
        options.binary_location = chromium
        for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                         f"--window-size={args.width},{args.height}", "--hide-scrollbars"):
            options.add_argument(argument)
        browser = webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=driver))
        try:
            browser.get(f"{server.url}?rater=demo")
            WebDriverWait(browser, 60).until(
                lambda b: b.find_element("tag name", "body").get_attribute("data-state") == "trial"
                and "busy" not in (b.find_element("tag name", "body").get_attribute("class") or ""))
            time.sleep(0.3)  # the progress bar's transition
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            browser.save_screenshot(str(args.out))
        finally:
            browser.quit()
            server.stop()
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    run_cli(main)
