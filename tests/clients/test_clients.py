"""`diffuse serve` driven by clients other people wrote: the `webuiapi` package (an
AUTOMATIC1111 API client), the official `openai` SDK, and Playwright driving Debian's Chromium
through the web page. Run by tests/clients/run.sh, which makes the venv.

    python tests/clients/test_clients.py --diffuse target/release/diffuse [--screenshot PATH]

Prints one line a check and, last, one JSON object with the results.
"""

import argparse
import base64
import io
import json
import os
import subprocess
import sys
import time
import urllib.request

from PIL import Image, ImageChops, ImageStat


class Server:
    """`diffuse serve` on a free port of this machine, stopped on exit."""

    def __init__(self, diffuse, *args):
        self.process = subprocess.Popen(
            [diffuse, "serve", "--listen", "127.0.0.1:0", *args],
            stdout=subprocess.PIPE,
            text=True,
        )
        line = self.process.stdout.readline().strip()
        if not line.startswith("listening on "):
            raise RuntimeError(f"the server did not start: {line!r}")
        self.base = line.removeprefix("listening on ")
        self.port = int(self.base.rsplit(":", 1)[1])

    def get(self, path):
        with urllib.request.urlopen(self.base + path) as response:
            return json.load(response)

    def __enter__(self):
        return self

    def __exit__(self, *_):
        self.process.terminate()
        self.process.wait(timeout=60)


def check_webuiapi(diffuse):
    import webuiapi

    with Server(diffuse) as server:
        api = webuiapi.WebUIApi(host="127.0.0.1", port=server.port, sampler="Euler", steps=12)
        assert api.util_get_model_names() == ["embedded"], api.util_get_model_names()
        assert "Euler a" in api.util_get_sampler_names()
        assert "karras" in api.util_get_scheduler_names()
        api.util_set_model("embedded")
        assert api.util_get_current_model() == "embedded"

        result = api.txt2img(prompt="a handwritten digit seven", seed=42, width=32, height=32, cfg_scale=3,
                             batch_size=2, n_iter=2)
        assert len(result.images) == 4, len(result.images)
        assert all(image.size == (32, 32) for image in result.images)
        assert result.info["all_seeds"] == [42, 42, 43, 43], result.info["all_seeds"]
        assert result.info["sampler_name"] == "Euler", result.info["sampler_name"]
        assert "Seed: 42" in result.info["infotexts"][0]
        again = api.txt2img(prompt="a handwritten digit seven", seed=42, width=32, height=32, cfg_scale=3)
        assert again.image.tobytes() == result.images[0].tobytes(), "the same seed gave another image"

        # Inpainting through the A1111 fields: white in the mask is repainted, black kept (up
        # to the autoencoder's round trip).
        init = again.image
        mask = Image.new("L", (32, 32), 0)
        mask.paste(255, (0, 0, 16, 32))
        edited = api.img2img(images=[init], mask_image=mask, prompt="a handwritten digit one", seed=3,
                             denoising_strength=1.0, width=32, height=32, cfg_scale=3).image
        assert edited.size == (32, 32)
        change = ImageChops.difference(edited.convert("L"), init.convert("L"))
        repainted = ImageStat.Stat(change.crop((0, 0, 12, 32))).mean[0]
        kept = ImageStat.Stat(change.crop((20, 0, 32, 32))).mean[0]
        assert kept < repainted / 2, f"kept half changed by {kept:.1f}, repainted by {repainted:.1f}"

        progress = api.get_progress()
        assert progress["state"]["job_count"] == 0, progress
        return {"images": len(result.images) + 2, "seeds": result.info["all_seeds"],
                "inpaint_mean_change": {"kept": round(kept, 1), "repainted": round(repainted, 1)}}


def check_openai(diffuse):
    import openai

    with Server(diffuse, "--api-key", "client-test-key") as server:
        client = openai.OpenAI(base_url=server.base + "/v1", api_key="client-test-key")
        models = [m.id for m in client.models.list()]
        assert models == ["embedded"], models
        response = client.images.generate(model="embedded", prompt="a photo of a sneaker", n=2,
                                          size="32x32", response_format="b64_json")
        assert len(response.data) == 2
        images = [Image.open(io.BytesIO(base64.b64decode(d.b64_json))) for d in response.data]
        assert all(image.size == (32, 32) for image in images)
        # Front ends that hard-code OpenAI's model names get the server's model.
        response = client.images.generate(model="dall-e-3", prompt="a photo of a bag", size="32x32")
        assert len(response.data) == 1
        try:
            client.images.generate(model="embedded", prompt="a cat", size="huge")
            raise AssertionError("a bad size was accepted")
        except openai.UnprocessableEntityError as e:
            assert "size" in str(e), e
        wrong = openai.OpenAI(base_url=server.base + "/v1", api_key="wrong", max_retries=0)
        try:
            wrong.models.list()
            raise AssertionError("a wrong key was accepted")
        except openai.AuthenticationError:
            pass
        return {"images": 3, "models": models}


def launch_chromium(playwright, chromium, attempts=3):
    """Headless Chromium. A launch that dies before any page opens (a SIGSEGV at start-up, seen
    once in a CI run whose rerun passed) says nothing about the page under test, so it is tried
    again; the last failure is raised as it is."""
    from playwright.sync_api import Error as PlaywrightError

    for attempt in range(attempts):
        try:
            return playwright.chromium.launch(
                executable_path=chromium,
                args=["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                      "--disable-background-networking", "--disable-component-update",
                      "--disable-sync"],
            )
        except PlaywrightError:
            if attempt == attempts - 1:
                raise


def check_browser(diffuse, screenshot):
    from playwright.sync_api import sync_playwright, expect

    chromium = os.environ.get("CHROMIUM", "/usr/bin/chromium")
    with Server(diffuse) as server, sync_playwright() as p:
        browser = launch_chromium(p, chromium)
        page = browser.new_page(viewport={"width": 1100, "height": 760})
        failed = []
        page.on("requestfailed", lambda r: failed.append(r.url))
        page.goto(server.base + "/")
        expect(page.locator("#model")).to_have_value("embedded")
        expect(page.locator("#sampler option", has_text="Euler a")).to_have_count(1)

        # A job long enough to watch: the bar moves and a preview shows before the image.
        page.fill("#prompt", "a photo of a sneaker")
        page.fill("#steps", "60")
        page.fill("#width", "128")
        page.fill("#height", "128")
        page.click("#generate")
        card = page.locator(".job").first
        expect(card).to_be_visible()
        page.wait_for_function(
            "() => { const b = document.querySelector('.job progress'); return b && b.value > 0.1; }",
            timeout=120_000)
        page.wait_for_function(
            "() => { const i = document.querySelector('.job img'); return i && i.src.startsWith('data:image/png'); }",
            timeout=120_000)
        moved = page.evaluate("document.querySelector('.job progress').value")
        expect(page.locator("#gallery figure")).to_have_count(1, timeout=300_000)
        figure = page.locator("#gallery figure").first
        expect(figure.locator("figcaption")).to_contain_text("Steps: 60")
        assert figure.locator("a").get_attribute("download").endswith(".png")
        shown = page.evaluate("document.querySelector('#gallery img').naturalWidth")
        assert shown == 128, shown

        # Two more jobs; cancel the second from its card: the first still arrives, the
        # second ends cancelled with nothing added.
        page.fill("#steps", "150")
        page.fill("#width", "256")
        page.fill("#height", "256")
        page.click("#generate")
        expect(page.locator(".job")).to_have_count(1)
        page.fill("#steps", "20")
        page.fill("#width", "64")
        page.fill("#height", "64")
        page.fill("#prompt", "a photo of a bag")
        page.click("#generate")
        expect(page.locator(".job")).to_have_count(2)
        second = page.locator(".job").first  # newest first
        second_id = int(second.get_attribute("data-job"))
        second.locator("button").click()
        first = page.locator(".job").last
        first_id = int(first.get_attribute("data-job"))
        first.locator("button").click()
        expect(page.locator(".job")).to_have_count(0, timeout=120_000)
        states = {job: server.get(f"/api/v1/jobs/{job}")["state"] for job in (first_id, second_id)}
        assert states == {first_id: "cancelled", second_id: "cancelled"}, states
        expect(page.locator("#gallery figure")).to_have_count(1)

        # The screenshot for the README: a finished picture and one in progress.
        page.fill("#steps", "")
        page.fill("#width", "")
        page.fill("#height", "")
        page.fill("#prompt", "a handwritten digit three")
        page.click("#generate")
        expect(page.locator("#gallery figure")).to_have_count(2, timeout=300_000)
        page.fill("#steps", "150")
        page.fill("#width", "128")
        page.fill("#height", "128")
        page.fill("#prompt", "a photo of a dress")
        page.click("#generate")
        page.wait_for_function(
            "() => { const b = document.querySelector('.job progress'); return b && b.value > 0.2; }",
            timeout=120_000)
        if screenshot:
            page.screenshot(path=screenshot)
        page.locator(".job button").first.click()
        browser.close()
        assert not failed, f"requests failed: {failed}"
        return {"progress_seen": moved, "cancelled": sorted(states)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--diffuse", default="target/release/diffuse")
    parser.add_argument("--screenshot")
    args = parser.parse_args()
    results, ok = {}, True
    for name, check in [("webuiapi", lambda: check_webuiapi(args.diffuse)),
                        ("openai", lambda: check_openai(args.diffuse)),
                        ("browser", lambda: check_browser(args.diffuse, args.screenshot))]:
        started = time.time()
        try:
            results[name] = {"ok": True, **check(), "seconds": round(time.time() - started, 1)}
            print(f"{name}: ok", flush=True)
        except Exception as e:  # report every check, then fail
            ok = False
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}"}
            print(f"{name}: FAILED: {type(e).__name__}: {e}", flush=True)
    print(json.dumps(results))
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
