"""A built latent browser checked in a real browser: Debian's chromium, headless, driven by selenium
through chromedriver, opened from file:// exactly as a reader would (no server, no extra flags
that loosen file:// rules). `check_browser(dir, screenshot)` skips only where chromium or
chromedriver is not installed (`apt-get install -y chromium chromium-driver`)."""

from __future__ import annotations

import shutil
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest

CHROMIUM = ("chromium", "chromium-browser", "google-chrome", "/usr/lib/chromium/chromium")
CHROMEDRIVER = ("chromedriver", "/usr/lib/chromium/chromedriver", "/usr/bin/chromedriver")
WAIT_S = 30


def _which(names) -> str | None:
    for name in names:
        path = shutil.which(name) or (name if Path(name).is_file() else None)
        if path:
            return path
    return None


def chrome(width: int = 1400, height: int = 1000):
    """A headless chromium session with its console log captured; skips without chromium."""
    binary, driver = _which(CHROMIUM), _which(CHROMEDRIVER)
    if binary is None or driver is None:
        pytest.skip("no chromium/chromedriver installed: apt-get install -y chromium chromium-driver")
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    opts = webdriver.ChromeOptions()
    opts.binary_location = binary
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                 f"--window-size={width},{height}", "--hide-scrollbars", "--force-device-scale-factor=1"):
        opts.add_argument(flag)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=opts, service=Service(executable_path=driver))


def _ready(d, what: str) -> None:
    """Wait for the page to say it drew everything (body[data-ready]) or showed an error; fail on the error."""
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(d, WAIT_S).until(lambda d: d.execute_script(
        "return document.body.dataset.ready === '1' || !!document.querySelector('.error')"))
    errors = d.execute_script("return [...document.querySelectorAll('.error')].map(e => e.textContent)")
    assert not errors, f"{what} shows an error: {errors}"


def _no_console_errors(d, what: str) -> None:
    severe = [e for e in d.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"{what}: console errors {severe}"


def _latents(d) -> list[int]:
    return d.execute_script("return [...document.querySelectorAll('#latent-table tbody tr')]"
                            ".map(r => Number(r.dataset.latent))")


def _click(d, element) -> None:
    d.execute_script("arguments[0].scrollIntoView({block: 'center'})", element)
    element.click()


def _follow(d, link, what: str) -> None:
    """Click a link and wait for its page to be drawn (not the old one's readiness)."""
    from selenium.webdriver.support.ui import WebDriverWait

    old = d.current_url
    _click(d, link)
    WebDriverWait(d, WAIT_S).until(lambda d: d.current_url != old)
    _ready(d, what)


def _params(url: str) -> dict:
    return {k: v[0] for k, v in parse_qs(urlparse(url).query).items()}


def check_latent_page(d, what: str) -> dict:
    """The latent page drew its top images (sprites loaded) and heatmaps (non-blank canvases)."""
    from selenium.webdriver.support.ui import WebDriverWait

    _ready(d, what)
    WebDriverWait(d, WAIT_S).until(lambda d: d.execute_script(
        "return [...document.querySelectorAll('img.sprite')].every(i => i.complete)"))
    images = d.execute_script("return [...document.querySelectorAll('img.sprite')].map(i => i.naturalWidth)")
    assert images and all(w > 0 for w in images), f"{what}: top images did not load ({images})"
    # a heatmap canvas never draws an image, so file:// leaves it readable
    lit = d.execute_script("""return [...document.querySelectorAll('canvas.heat')].map(c => {
        const px = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
        let n = 0; for (let i = 3; i < px.length; i += 4) if (px[i] > 0) n++; return n; })""")
    assert len(lit) == len(images), f"{what}: {len(images)} images but {len(lit)} heatmaps"
    assert lit[0] > 0, f"{what}: the top image's heatmap is blank"
    bars = d.execute_script("return document.querySelectorAll('svg.chart rect.bar').length")
    assert bars > 0, f"{what}: no histogram or class bars"
    _no_console_errors(d, what)
    return {"images": len(images), "lit_patches": lit}


def check_browser(browser_dir, screenshot, require_match: bool = True) -> dict:
    """Open `browser_dir`/index.html from file:// headless and check: no console errors on any
    page; an SAE page's table reorders when a sort header is clicked, and filters; a latent page
    shows its images and heatmaps; its link to the matched latent opens the other model's latent
    (unless `require_match` is False and no SAE has a cross-model comparison). Saves screenshots:
    `screenshot` (the latent page), `<stem>-sae<suffix>` and `<stem>-index<suffix>`."""
    from selenium.webdriver.common.by import By

    browser_dir, screenshot = Path(browser_dir).resolve(), Path(screenshot)
    index = browser_dir / "index.html"
    assert index.is_file(), f"{index} is missing: the browser was not finished"
    shots = {"latent": screenshot, "sae": screenshot.with_name(f"{screenshot.stem}-sae{screenshot.suffix}"),
             "index": screenshot.with_name(f"{screenshot.stem}-index{screenshot.suffix}")}
    d = chrome()
    try:
        d.get(index.as_uri())
        _ready(d, "index.html")
        _no_console_errors(d, "index.html")
        d.save_screenshot(str(shots["index"]))
        saes = d.execute_script("return VISAE.get('manifest').saes")
        # an SAE matched to another model's SAE that this browser also holds
        crossed = [(s, i) for s in saes for i, c in enumerate(s["comparisons"]) if c["cross_model"] and c["other"]]
        assert crossed or not require_match, "no SAE has a cross-model comparison with a page: give --matchings " \
                                             "of two models"
        sae, comp = crossed[0] if crossed else (saes[0], None)
        links = d.find_elements(By.CSS_SELECTOR, "a.sae-link")
        link = next(a for a in links if _params(a.get_attribute("href")) ==
                    {"model": sae["model"], "dataset": sae["dataset"], "layer": sae["layer"], "sae": sae["sae"]})
        _follow(d, link, "sae.html")
        before = _latents(d)
        assert before == sorted(before) and len(before) > 1, f"sae.html: rows not in latent order ({before[:5]})"
        _click(d, d.find_element(By.CSS_SELECTOR, "th.sortable[data-col='frequency']"))
        after = _latents(d)
        assert after != before, "sae.html: clicking the frequency header did not reorder the rows"
        freq = d.execute_script("const t = VISAE.get(arguments[0]); return arguments[1].map(j => t.data.frequency[j])",
                                f"table/{sae['key']}", after)
        assert freq == sorted(freq, reverse=True), "sae.html: the frequency sort is not descending"
        # a filter: latents that fire on at least `top` images (a full row of top images)
        least = sae["top"] / sae["images"]
        d.find_element(By.CSS_SELECTOR, "input[data-filter='min.frequency']").send_keys(repr(least))
        kept = d.execute_script("const t = VISAE.get(arguments[0]); return [...document.querySelectorAll("
                                "'#latent-table tbody tr')].map(r => t.data.frequency[Number(r.dataset.latent)])",
                                f"table/{sae['key']}")
        assert kept and min(kept) >= least, f"sae.html: the frequency filter kept {min(kept or [0])} < {least}"
        sort = f"match_r_{comp}" if comp is not None else "max_activation"
        _click(d, d.find_element(By.CSS_SELECTOR, f"th.sortable[data-col='{sort}']"))
        d.execute_script("window.scrollTo(0, 0); document.querySelector('.scroll').scrollLeft = 0")
        _no_console_errors(d, "sae.html")
        d.save_screenshot(str(shots["sae"]))
        top = _latents(d)[0]
        _follow(d, d.find_element(By.CSS_SELECTOR, f"#latent-table tbody tr[data-latent='{top}'] td a"), "latent.html")
        here = _params(d.current_url)
        assert here["latent"] == str(top) and here["model"] == sae["model"], f"latent link opened {d.current_url}"
        checked = {"sae": sae["key"], "latent": top, **check_latent_page(d, f"latent {top} of {sae['key']}")}
        d.save_screenshot(str(shots["latent"]))
        checked["screenshots"] = {k: str(v) for k, v in shots.items()}
        if comp is None:
            return checked
        match = d.find_elements(By.CSS_SELECTOR, "a.match-link[data-kind='cross']")
        assert match, f"latent {top} of {sae['key']} has no link to its match in the other model"
        target = int(match[0].text.split()[-1])
        _follow(d, match[0], "the matched latent's page")
        there = _params(d.current_url)
        other = next(s for s in saes if s["key"] == sae["comparisons"][comp]["other"])
        assert (there["model"], there["sae"], there["latent"]) == (other["model"], other["sae"], str(target)), \
            f"the match link opened {d.current_url}, not latent {target} of {other['key']}"
        assert there["model"] != sae["model"]
        check_latent_page(d, f"latent {target} of {other['key']}")
        heading = d.find_element(By.TAG_NAME, "h1").text
        assert heading == f"Latent {target}", heading
        checked["match"] = {"sae": other["key"], "latent": target}
        return checked
    finally:
        d.quit()
