"""`uae-gen serve`: the playground driven in headless Chromium (Debian's package, through Playwright), bad input
through the Gradio client, 20 requests at once, and the CLI without Gradio. One server for the module, serving the
tiny random-weight pipeline of test_pipeline.py.

Run as a script to time the page on another pipeline and take the README's screenshot with the same browser code:

    python tests/test_serve.py --pipeline uae_gen_demo/pipeline --class-name "digit 7" --screenshot docs/playground.png
"""

import argparse
import io
import math
import os
import shlex
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from playwright.sync_api import expect

MAX_IMAGES, MAX_QUEUE = 4, 8
CHROMIUM = shutil.which("chromium")
NO_CHROMIUM = "headless Chromium is missing: apt-get install -y chromium (Debian's package; Playwright drives it)"


# ---- the server and the browser --------------------------------------------------------------------------------
@contextmanager
def running_server(pipeline_dir, log_path, *extra_args):
    """`uae-gen serve` in a subprocess on a free port of 127.0.0.1 (its default host); yields (url, pid)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "uae_gen.cli", "serve", "--pipeline", str(pipeline_dir), "--port", str(port),
               *extra_args]
    # One torch thread, as in this process, so that the server's pixels can equal a call made here bit for bit.
    env = {**os.environ, "OMP_NUM_THREADS": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    with open(log_path, "w") as log:
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 120
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"uae-gen serve exited with {process.returncode}:\n{Path(log_path).read_text()}")
            try:
                urllib.request.urlopen(url, timeout=5).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.25)
        yield url, process.pid
    finally:
        process.terminate()
        process.wait(timeout=30)


@contextmanager
def headless_chromium():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM)
        try:
            yield browser
        finally:
            browser.close()


def open_playground(browser, url):
    """A fresh page (a new Gradio session); returns (page, seconds until the Generate button shows)."""
    page = browser.new_page(viewport={"width": 1280, "height": 1000}, accept_downloads=True)
    start = time.perf_counter()
    page.goto(url)
    page.locator("#generate").wait_for()
    return page, time.perf_counter() - start


def choose_class(page, text, option=None):
    """Type into the searchable class box; click ``option`` in the filtered list, or press Enter (typed value)."""
    box = page.locator("#class input")
    box.click()
    box.fill("")
    box.press_sequentially(text)
    if option is None:
        box.press("Enter")
    else:
        page.get_by_role("option", name=option, exact=True).click()


def choose(page, label, option):
    page.get_by_label(label).click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, elem_id, value):
    page.locator(f"#{elem_id} input").fill(str(value))


def generate_in_page(page, num_images):
    """Click Generate; returns (seconds to the first step's decode, seconds to all images)."""
    start = time.perf_counter()
    page.locator("#generate").click()
    page.locator("#live-strip img").first.wait_for()
    first_decode = time.perf_counter() - start
    page.locator("#images img").nth(num_images - 1).wait_for()
    page.locator("#download").wait_for()
    return first_decode, time.perf_counter() - start


def gallery_pixels(page, elem_id):
    """The PNGs a gallery shows, fetched from their URLs, as uint8 arrays."""
    sources = [image.get_attribute("src") for image in page.locator(f"#{elem_id} img").all()]
    return [np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB")) for src in sources]


# ---- fixtures ---------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_pipeline(tmp_path_factory):
    from .test_pipeline import tiny_pipeline

    path = tmp_path_factory.mktemp("serve") / "pipeline"
    tiny_pipeline().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def pipe(saved_pipeline, one_torch_thread):
    from uae_gen import UAEDiTPipeline

    pipe = UAEDiTPipeline.from_pretrained(saved_pipeline)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def server(saved_pipeline, tmp_path_factory):
    log = tmp_path_factory.mktemp("serve-log") / "server.log"
    with running_server(saved_pipeline, log, "--max-images", str(MAX_IMAGES), "--max-queue", str(MAX_QUEUE)) as url_pid:
        yield url_pid


@pytest.fixture(scope="module")
def browser():
    if CHROMIUM is None:
        pytest.skip(NO_CHROMIUM)
    with headless_chromium() as browser:
        yield browser


def expected_pixels(pipe, class_label, num_images, steps, seed, guidance_scale=4.0, guidance_interval=(0.0, 1.0),
                    solver="euler"):
    """UAEDiTPipeline(...) called here with the page's settings."""
    pipe.scheduler.register_to_config(solver=solver)
    images = pipe(class_labels=[class_label] * num_images, guidance_scale=guidance_scale,
                  guidance_interval=guidance_interval, num_inference_steps=steps,
                  generator=torch.Generator().manual_seed(seed)).images
    return [np.asarray(image) for image in images]


def assert_same_images(shown, expected):
    assert len(shown) == len(expected)
    for a, b in zip(shown, expected):
        assert a.shape == b.shape and np.array_equal(a, b)


# ---- in the browser ---------------------------------------------------------------------------------------------
def test_golden_retriever_in_the_browser_equals_the_pipeline_and_the_download_reproduces(
        browser, server, pipe, saved_pipeline, tmp_path, capsys):
    url, _ = server
    page, load_seconds = open_playground(browser, url)
    choose_class(page, "golden retriever", option="golden retriever (207)")
    set_number(page, "num-images", 2)
    set_number(page, "steps", 3)
    choose(page, "guidance window (band schedule)", "band 0 moving (0.3 to 1)")  # from the model's band schedule
    expect(page.locator("#guidance-lo input")).to_have_value("0.3")  # the window fills the interval
    choose(page, "solver", "heun")
    set_number(page, "seed", 7)
    first_decode, all_images = generate_in_page(page, num_images=2)
    with capsys.disabled():
        print(f"\nplayground, tiny pipeline: page load {load_seconds:.2f} s, first step decode {first_decode:.2f} s, "
              f"2 images at 3 heun steps {all_images:.2f} s after the click")

    expected = expected_pixels(pipe, "golden retriever", 2, steps=3, seed=7, guidance_interval=(0.3, 1.0),
                               solver="heun")
    assert_same_images(gallery_pixels(page, "images"), expected)
    strip = gallery_pixels(page, "live-strip")
    assert len(strip) == 3 and np.array_equal(strip[-1], expected[0])  # one decode per step; the last is the image
    bands = gallery_pixels(page, "band-previews")
    assert len(bands) == pipe.scheduler.config.num_bands and np.array_equal(bands[-1], expected[0])

    with page.expect_download() as download:
        page.locator("#download").click()
    png = Image.open(download.value.path())
    png.load()
    assert (png.text["class_id"], png.text["seed"], png.text["steps"], png.text["solver"]) == ("207", "7", "3", "heun")
    assert png.text["guidance_interval"] == "0.3 1.0" and Path(png.text["pipeline"]) == saved_pipeline.resolve()
    # The command in the PNG, run here, writes the same pixels.
    from uae_gen.cli import main

    argv = shlex.split(png.text["command"])
    assert argv[:2] == ["uae-gen", "generate"]
    argv[argv.index("--out") + 1] = str(tmp_path / "again.png")
    main(argv[1:])
    assert np.array_equal(np.asarray(Image.open(tmp_path / "again.png")), np.asarray(png.convert("RGB")))
    page.close()


def test_bad_input_in_the_browser_shows_the_error_and_the_next_request_succeeds(browser, server, pipe):
    url, _ = server
    page, _ = open_playground(browser, url)
    choose_class(page, "no such class")
    page.locator("#generate").click()
    page.get_by_text("unknown class name 'no such class'").wait_for()
    assert page.locator("#images img").count() == 0

    choose_class(page, "3")  # a typed class id
    set_number(page, "guidance-scale", "")  # a number field cannot hold NaN; empty is the page's non-number
    page.locator("#generate").click()
    page.get_by_text("guidance scale must be a finite number, got None").wait_for()

    set_number(page, "guidance-scale", 4)
    set_number(page, "num-images", 1)
    set_number(page, "steps", 2)
    page.locator("#random-seed").click()
    expect(page.locator("#seed input")).not_to_have_value("0")
    set_number(page, "seed", 11)
    generate_in_page(page, num_images=1)
    assert_same_images(gallery_pixels(page, "images"), expected_pixels(pipe, 3, 1, steps=2, seed=11))
    page.close()


# ---- through the Gradio client ----------------------------------------------------------------------------------
def request(class_text="3", num_images=1, steps=2, guidance_scale=4.0, seed=0):
    """The /generate endpoint's inputs, in the page's order."""
    return (class_text, num_images, steps, guidance_scale, "cfg", 0.0, 1.0, "euler", seed)


def client_pixels(result):
    return [np.asarray(Image.open(item["image"]).convert("RGB")) for item in result[0]]


def test_bad_input_is_one_clear_error_and_the_server_keeps_serving(server, pipe):
    from gradio_client import Client
    from gradio_client.exceptions import AppError  # a gr.Error raised in the app, with its message

    client = Client(server[0], verbose=False)
    for inputs, message in [
        (request(class_text="no such class"), "unknown class name 'no such class'"),
        (request(class_text="1000"), "class label 1000 out of range"),
        (request(steps=0), "steps must be a whole number from 1 to 1000, got 0"),
        (request(num_images=MAX_IMAGES + 1), f"number of images must be a whole number from 1 to {MAX_IMAGES}"),
    ]:
        with pytest.raises(AppError, match=message):
            client.predict(*inputs, api_name="/generate")
    result = client.predict(*request(seed=5), api_name="/generate")
    assert_same_images(client_pixels(result), expected_pixels(pipe, 3, 1, steps=2, seed=5))


def test_twenty_requests_at_once_complete_or_get_the_busy_message_and_memory_stays_flat(server, pipe, capsys):
    from gradio_client import Client
    from gradio_client.utils import QueueError  # "Queue is full! Please try again."

    url, pid = server
    client = Client(url, verbose=False)
    client.predict(*request(seed=100), api_name="/generate")
    memory_after_first = psutil.Process(pid).memory_info().rss

    jobs = [client.submit(*request(seed=seed), api_name="/generate") for seed in range(20)]
    completed, busy = {}, 0
    for seed, job in enumerate(jobs):
        try:
            completed[seed] = job.result(timeout=120)
        except QueueError:
            busy += 1
    memory_after_all = psutil.Process(pid).memory_info().rss
    with capsys.disabled():
        print(f"\n20 requests at once (queue {MAX_QUEUE}): {len(completed)} completed, {busy} busy; server memory "
              f"{memory_after_first / 2**20:.0f} MiB after the first, {memory_after_all / 2**20:.0f} MiB after all")

    assert len(completed) + busy == 20 and len(completed) >= 1
    for seed, result in completed.items():  # each request got its own images, none another's
        assert_same_images(client_pixels(result), expected_pixels(pipe, 3, 1, steps=2, seed=seed))
    assert abs(memory_after_all - memory_after_first) <= 0.10 * memory_after_first


# ---- in this process --------------------------------------------------------------------------------------------
def test_page_inputs_are_checked_with_messages_naming_the_input(saved_pipeline, one_torch_thread):
    from uae_gen.serve import Playground

    playground = Playground(str(saved_pipeline), max_images=MAX_IMAGES)
    good = dict(class_text="golden retriever", num_images=2, steps=3, guidance_scale=4.0, guidance="cfg",
                guidance_lo=0.0, guidance_hi=1.0, solver="euler", seed=0)
    assert playground.settings(**good).class_id == 207
    for change, message in [
        (dict(guidance_scale=math.nan), "guidance scale must be a finite number, got nan"),
        (dict(guidance_scale=None), "guidance scale must be a finite number, got None"),
        (dict(guidance_lo=0.9, guidance_hi=0.1), r"guidance_interval must be \(lo, hi\)"),
        (dict(steps=0), "steps must be a whole number from 1 to 1000, got 0"),
        (dict(num_images=MAX_IMAGES + 1), f"from 1 to {MAX_IMAGES}, got {MAX_IMAGES + 1}"),
        (dict(class_text=""), "choose a class"),
        (dict(seed=-1), "seed must be a whole number >= 0"),
    ]:
        with pytest.raises(ValueError, match=message):
            playground.settings(**{**good, **change})


def test_the_page_names_the_token_layout(saved_pipeline, tmp_path, one_torch_thread):
    from uae_gen import AutoencoderUAE, FlowMatchBandScheduler, UAEDiT, UAEDiTPipeline
    from uae_gen.serve import Playground

    assert "frequency tokens" not in Playground(str(saved_pipeline)).describe()  # spatial: one token per cell
    # dit_tiny's layout: all 64 coefficients of the 8x8 latent, four per token
    transformer = UAEDiT.from_preset("DiT-tiny", in_channels=64, sample_size=8, num_classes=10, frequency_tokens=64,
                                     coefficients_per_token=4)
    UAEDiTPipeline(transformer=transformer, vae=AutoencoderUAE.from_preset("tiny", dct_lowpass_coefficients=64),
                   scheduler=FlowMatchBandScheduler(latent_dim=64 * 8 * 8)).save_pretrained(tmp_path / "frequency")
    assert "latent 64x8x8, 16 frequency tokens (64 DCT coefficients per channel)" in \
        Playground(str(tmp_path / "frequency")).describe()


def test_download_is_written_whole_with_normal_permissions_and_the_settings(tmp_path):
    from uae_gen.serve import GenerationSettings, save_download

    settings = GenerationSettings(pipeline="/p", class_id=207, class_name="golden retriever", num_images=2, steps=3,
                                  guidance_scale=4.0, guidance_interval=(0.0, 1.0), guidance="cfg", solver="euler",
                                  seed=7, device="cpu")
    images = torch.rand(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "grid.png"
    save_download(images, path, settings.png_text(path.name))
    assert [p.name for p in tmp_path.iterdir()] == ["grid.png"]  # no temporary file left
    assert path.stat().st_mode & 0o777 == 0o666 & ~_umask()
    with Image.open(path) as png:
        assert png.size == (2 * 8 + 3 * 2, 8 + 2 * 2)  # the grid `uae-gen generate` writes: one row, 2 px padding
        assert png.text["guidance_scale"] == "4.0" and png.text["num_images"] == "2"
        assert shlex.split(png.text["command"])[-2:] == ["--out", "grid.png"]


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_serve_without_gradio_names_the_app_extra(monkeypatch, capsys):
    from uae_gen.cli import main

    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    with pytest.raises(SystemExit, match=r'pip install -e "\.\[app\]"'):
        main(["serve", "--pipeline", "unused"])


def test_serve_on_a_busy_port_is_one_clear_error_before_the_model_loads(capsys):
    from uae_gen.cli import main

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as exit_info:
            main(["serve", "--pipeline", "not-loaded-first", "--port", str(port)])
    assert exit_info.value.code == 2
    assert f"cannot serve on 127.0.0.1:{port}" in capsys.readouterr().err


# ---- as a script: timings and the README screenshot --------------------------------------------------------------
def main() -> None:
    parser = argparse.ArgumentParser(description="Serve a pipeline, drive the playground in headless Chromium, "
                                     "print the page load and time to first image, optionally save a screenshot.")
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--class-name", required=True, help="a name from the pipeline's id2label")
    parser.add_argument("--num-images", type=int, default=8)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--guidance-scale", type=float, default=7.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--screenshot", default=None, help="PNG of the page after generation")
    args = parser.parse_args()
    if CHROMIUM is None:
        raise SystemExit(NO_CHROMIUM)
    with running_server(args.pipeline, "serve.log") as (url, _), headless_chromium() as browser:
        page, load_seconds = open_playground(browser, url)
        choose_class(page, args.class_name)
        set_number(page, "num-images", args.num_images)
        set_number(page, "steps", args.steps)
        set_number(page, "guidance-scale", args.guidance_scale)
        set_number(page, "seed", args.seed)
        first_decode, all_images = generate_in_page(page, args.num_images)
        print(f"{args.pipeline}: page load {load_seconds:.2f} s, first step decode {first_decode:.2f} s, "
              f"{args.num_images} images at {args.steps} steps {all_images:.2f} s after the click")
        if args.screenshot:  # 256 colours keep the README's picture small
            # the strip's last images may still be loading when the gallery reports them
            page.wait_for_function("Array.from(document.images).every(i => i.complete && i.naturalWidth > 0)")
            Image.open(io.BytesIO(page.screenshot(full_page=True))).quantize(256).save(args.screenshot, optimize=True)


if __name__ == "__main__":
    main()
