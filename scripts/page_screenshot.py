"""Screenshot of the library page on the committed library (docs/library_page.png): a search, a card, a routed
question, driven in Debian's chromium.
    python scripts/page_screenshot.py
"""
import socket
import threading
import time

import uvicorn
from playwright.sync_api import sync_playwright

from lorahub_plus import Hub
from lorahub_plus.paths import REPO_ROOT
from lorahub_plus.serving.app import create_app

with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
server = uvicorn.Server(uvicorn.Config(create_app(Hub(REPO_ROOT / "library")), host="127.0.0.1", port=port,
                                       log_level="warning"))
threading.Thread(target=server.run, daemon=True).start()
while not server.started:
    time.sleep(0.05)
with sync_playwright() as p:
    browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=[
        "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync"])
    page = browser.new_page(viewport={"width": 1000, "height": 1400})
    page.goto(f"http://127.0.0.1:{port}/")
    page.fill("#query", "add two numbers")
    page.press("#query", "Enter")
    page.wait_for_selector(".hit")
    page.locator(".hit").first.click()
    page.fill("#prompt", "What is 47 plus 38?")
    page.click("#ask")
    page.wait_for_function("document.getElementById('used').textContent.includes('answered by')", timeout=120_000)
    out = REPO_ROOT / "docs" / "library_page.png"
    page.screenshot(path=str(out), full_page=True)
    print("answer:", page.inner_text("#answer"), "|", page.inner_text("#used"), "->", out)
    browser.close()
server.should_exit = True
