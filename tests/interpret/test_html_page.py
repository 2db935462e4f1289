"""index.html: the data it embeds, its escaping, and the page in a real browser.

The browser tests drive headless Chromium with Selenium. They skip only when
no Chromium and chromedriver are installed (`apt-get install chromium
chromium-driver`; `.ci/run` installs them, so CI runs them).
"""

import base64
import io
import json
import re
import shutil
import time

import numpy as np
import pytest

from attnx.interpret import html_page
from attnx.interpret.html_page import (
    AttentionMap,
    PageExample,
    SourceImage,
    decode_weights,
    embed_json,
    encode_weights,
    read_page_data,
    write_page,
)

# Labels that break naive pages: markup, entities, quotes, a script end, a
# comment opener, CJK, Hebrew and Arabic (right to left), an astral emoji,
# the JavaScript line separators, a space and an empty token.
TRICKY = [
    "<b>",
    "&amp;",
    "\"'`",
    "</script>",
    "<!--",
    "日本語",
    "עברית",
    "مرحبا",
    "😀",
    "a\u2028b\u2029",
    " ",
    "",
]
TARGET = ["x", "y", "<eos>"]
# The known cell of the small map: query 1 ('y') over key 2 ('c') is 0.7.
SMALL_WEIGHTS = np.array(
    [[0.5, 0.25, 0.125, 0.125], [0.1, 0.2, 0.7, 0.0], [0.25, 0.25, 0.25, 0.25]], np.float32
)


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _map(name, queries, keys, weights, kind="cross", head=0, layer=0) -> AttentionMap:
    return AttentionMap(name, layer, kind, head, queries, keys, weights)


def _small_example() -> PageExample:
    source = ["a", "b", "c", "d"]
    return PageExample(
        source,
        TARGET,
        "x y",
        "x y",
        [
            _map("decoder/layer_0/cross_attention", TARGET, source, SMALL_WEIGHTS),
            _map("decoder/layer_0/cross_attention", TARGET, source, SMALL_WEIGHTS, head="mean"),
        ],
    )


def _tricky_example() -> PageExample:
    rng = np.random.default_rng(0)
    weights = _softmax(rng.normal(size=(len(TARGET), len(TRICKY))))
    return PageExample(
        TRICKY,
        TARGET,
        "réf </script> 日本 עברית",
        'hyp <i>"&"</i>',
        [_map("decoder/attention", TARGET, TRICKY, weights, kind="global")],
    )


def _png_base64(rows: int = 28, cols: int = 28) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    plt.imsave(buffer, np.random.default_rng(1).random((rows, cols, 3)), format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _spatial_example(png: str | None) -> PageExample:
    cells = [f"({r},{c})" for r in range(3) for c in range(4)]
    words = ["a", "cat", "<eos>"]
    weights = np.full((3, 12), 0.01)
    weights[1, 6] = 0.89  # 'cat' looks at cell (1, 2)
    weights[0, 0] = 0.89
    weights[2, 11] = 0.89
    spatial = _map("decoder/spatial_attention", words, cells, weights, kind="spatial")
    return PageExample(cells, words, "a cat", "a cat", [spatial], SourceImage((3, 4), png))


def _long_example(length: int = 512) -> PageExample:
    rng = np.random.default_rng(2)
    tokens = [f"tok{i}" for i in range(length)]
    weights = _softmax(3 * rng.normal(size=(length, length)))
    return PageExample(
        tokens,
        tokens,
        " ".join(tokens),
        " ".join(tokens),
        [_map("encoder/layer_0/self_attention", tokens, tokens, weights, kind="encoder-self")],
    )


# ---------------------------------------------------------------- no browser


def test_embed_json_is_ascii_and_cannot_close_the_script():
    value = {"labels": TRICKY, "text": "</script><script>alert(1)</script><!-- -->"}
    text = embed_json(value)
    assert text.isascii()
    assert not set("<>&") & set(text)
    assert "\u2028" not in text and "\u2029" not in text
    assert json.loads(text) == value


def test_the_embedded_data_round_trips(tmp_path):
    example = _tricky_example()
    page = write_page(tmp_path / "index.html", [example], title="t")
    data = read_page_data(page.path)
    (record,) = data["examples"]
    assert record["source"] == TRICKY and record["target"] == TARGET
    assert record["reference"] == example.reference
    assert record["hypothesis"] == example.hypothesis
    (entry,) = record["maps"]
    assert record["labels"][entry["q"]] == TARGET
    assert record["labels"][entry["k"]] == TRICKY
    assert (entry["name"], entry["kind"], entry["layer"], entry["head"]) == (
        "decoder/attention",
        "global",
        0,
        0,
    )
    np.testing.assert_allclose(decode_weights(entry), example.maps[0].weights, atol=1e-5)


def test_the_page_is_ascii_and_its_scripts_end_where_they_should(tmp_path):
    page = write_page(tmp_path / "index.html", [_tricky_example()], title="t")
    raw = page.path.read_bytes()
    assert raw.isascii() and page.size_bytes == len(raw)
    text = raw.decode("ascii")
    # The data's </script> and <!-- are escaped: only the page's own two scripts end.
    assert len(re.findall(r"</script", text, re.I)) == 2
    assert "<!--" not in text


def test_title_and_summary_are_escaped_into_a_table(tmp_path):
    title = "</title><script>alert(1)</script> 日本 & co %DATA%"
    summary = {"pointing accuracy": 0.934567, "<n>": 12, "ok": True, "note": "a & b"}
    text = write_page(tmp_path / "i.html", [_small_example()], title=title, summary=summary)
    text = text.path.read_text("ascii")
    assert "<script>alert(1)" not in text
    assert (
        "&lt;/title&gt;&lt;script&gt;alert(1)&lt;/script&gt; &#26085;&#26412; &amp; co %DATA%"
        in text
    )
    table = re.search(r'<table id="summary">(.*?)</table>', text, re.S).group(1)
    assert "<th>pointing accuracy</th><td>0.9346</td>" in table
    assert "<th>&lt;n&gt;</th><td>12</td>" in table
    assert "<td>True</td>" in table and "<td>a &amp; b</td>" in table


def test_the_page_loads_nothing_from_outside(tmp_path):
    example = _spatial_example(_png_base64())
    text = write_page(tmp_path / "i.html", [example], title="t").path.read_text("ascii")
    assert "http:" not in text and "https:" not in text and "url(" not in text
    for attribute in re.findall(r'\b(?:src|href)="([^"]*)"', text):
        assert attribute.startswith("data:"), attribute
    assert "default-src 'none'" in text  # the browser itself refuses any other load


def test_quantised_weights_keep_zeros_signs_and_non_finite_values():
    rng = np.random.default_rng(3)
    weights = rng.random((6, 50)) ** 4
    weights[0] = 0.0  # a row of zeros
    weights[1] = 0.3  # a constant row
    weights[2, 10:] = 0.0  # masked keys
    weights[3] = rng.normal(size=50) * 5  # signed scores (rollout, attribution)
    weights[4, 7] = np.nan
    weights[4, 8] = np.inf
    weights[5] = np.nan  # a row with no finite weight
    entry = encode_weights(weights)
    decoded = decode_weights(entry)
    assert np.array_equal(np.isnan(decoded), ~np.isfinite(weights))
    finite = np.isfinite(weights)
    span = np.nan_to_num(np.array(entry["hi"]) - np.array(entry["lo"]))[:, None]
    error = np.abs(np.where(finite, decoded - weights, 0.0))
    # The documented bound, plus the float32 rounding of the row's bounds.
    bound = span / 131068 + 1e-6 * np.abs(np.nan_to_num(weights, posinf=0)).max(1, keepdims=True)
    assert np.all(error <= bound + 1e-12)
    assert np.all(decoded[0] == 0.0) and np.all(decoded[2, 10:] == 0.0)
    np.testing.assert_allclose(decoded[1], 0.3, rtol=1e-7)


def test_a_512_token_map_makes_a_page_under_800_kb(tmp_path):
    page = write_page(tmp_path / "index.html", [_long_example()], title="512")
    print(f"512 x 512 page: {page.size_bytes:,} bytes")
    # 512 * 512 weights * 2 bytes * 4/3 (base64) = 699,051 bytes, plus labels and code.
    assert page.size_bytes < 800_000
    (entry,) = read_page_data(page.path)["examples"][0]["maps"]
    assert np.abs(decode_weights(entry) - _long_example().maps[0].weights).max() < 2e-5


def test_a_map_too_big_to_embed_is_named_not_dropped(tmp_path):
    small = _small_example()
    page = write_page(tmp_path / "index.html", [small], title="t", max_map_cells=10)
    assert [(m.example, m.name, m.head, m.shape) for m in page.omitted] == [
        (0, "decoder/layer_0/cross_attention", 0, (3, 4)),
        (0, "decoder/layer_0/cross_attention", "mean", (3, 4)),
    ]
    text = page.path.read_text("ascii")
    banner = re.search(r'<div id="omitted".*?</div>', text, re.S).group(0)
    assert "2 maps not embedded" in banner
    assert "decoder/layer_0/cross_attention</code>, head mean (3 x 4)" in banner
    assert "over the limit of 10 weights per map" in banner
    entries = read_page_data(page.path)["examples"][0]["maps"]
    assert all("data" not in e and "over the limit" in e["omitted"] for e in entries)


def test_maps_past_the_page_budget_are_named(tmp_path):
    page = write_page(tmp_path / "index.html", [_small_example()], title="t", max_page_bytes=40)
    # A 3 x 4 map counts 104 bytes: 32 of base64 weights and 72 for its rows' bounds.
    assert len(page.omitted) == 2
    assert page.omitted[0].reason == (
        "its 104 bytes would take the page's data past its limit of 40 bytes"
    )
    page = write_page(tmp_path / "index.html", [_small_example()], title="t", max_page_bytes=150)
    assert [m.head for m in page.omitted] == ["mean"]


def test_plain_dicts_are_accepted(tmp_path):
    example = _spatial_example(None)
    as_dict = {
        "source_tokens": example.source_tokens,
        "target_tokens": example.target_tokens,
        "reference": example.reference,
        "hypothesis": example.hypothesis,
        "maps": [vars(m) for m in example.maps],
        "image": {"grid_shape": (3, 4)},
    }
    page = write_page(tmp_path / "index.html", [as_dict], title="t")
    assert read_page_data(page.path)["examples"][0]["image"] == {"grid": [3, 4], "png": None}


@pytest.mark.parametrize(
    "change, message",
    [
        ({"kind": "cross-attention"}, "kind 'cross-attention' is none of"),
        ({"head": -1}, "head must be an index"),
        ({"head": "all"}, "head must be an index"),
        ({"weights": np.ones((3, 5))}, "weights have shape (3, 5) but there are 3 query"),
    ],
)
def test_malformed_maps_are_refused_by_name(tmp_path, change, message):
    example = _small_example()
    bad = AttentionMap(**{**vars(example.maps[0]), **change})
    with pytest.raises(ValueError, match=re.escape(message)) as error:
        write_page(
            tmp_path / "i.html", [PageExample(**{**vars(example), "maps": [bad]})], title="t"
        )
    assert "example 0 map 'decoder/layer_0/cross_attention'" in str(error.value)


def test_malformed_examples_are_refused(tmp_path):
    example = _small_example()
    twice = PageExample(**{**vars(example), "maps": [example.maps[0], example.maps[0]]})
    with pytest.raises(ValueError, match="two maps of this name and head"):
        write_page(tmp_path / "i.html", [twice], title="t")
    wrong_grid = _spatial_example(None)
    wrong_grid = PageExample(**{**vars(wrong_grid), "image": SourceImage((4, 4))})
    with pytest.raises(ValueError, match="grid 4 x 4 has 16 cells but the source has 12"):
        write_page(tmp_path / "i.html", [wrong_grid], title="t")
    not_png = PageExample(**{**vars(_spatial_example(None)), "image": SourceImage((3, 4), "@@")})
    with pytest.raises(ValueError, match="png_base64 is not base64"):
        write_page(tmp_path / "i.html", [not_png], title="t")
    with pytest.raises(ValueError, match="a list of tokens, not one string"):
        write_page(
            tmp_path / "i.html",
            [PageExample(**{**vars(example), "source_tokens": "abcd"})],
            title="t",
        )


# ---------------------------------------------------------------- in a browser


def _chromium() -> tuple[str, str] | None:
    binary = next(
        (
            path
            for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
            if (path := shutil.which(name))
        ),
        None,
    )
    driver = shutil.which("chromedriver")
    return (binary, driver) if binary and driver else None


@pytest.fixture(scope="module")
def browser():
    paths = _chromium()
    if paths is None:
        pytest.skip(
            "no browser installed: chromium and chromedriver are not on PATH "
            "(apt-get install chromium chromium-driver; .ci/run installs them)"
        )
    # Imported here so that the tests above run without Selenium; with a
    # browser installed, a missing Selenium is an error (it is in the test extra).
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = paths[0]
    for argument in (
        "--headless=new",
        "--no-sandbox",  # CI runs as root, where Chromium's sandbox cannot start
        "--disable-dev-shm-usage",
        "--disable-gpu",
        "--window-size=1280,1000",
        "--force-device-scale-factor=1",
    ):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    # The system's chromedriver, named: Selenium must not try to download one.
    driver = webdriver.Chrome(service=Service(paths[1]), options=options)
    driver.set_page_load_timeout(60)
    print(
        f"browser: {driver.capabilities.get('browserName')} "
        f"{driver.capabilities.get('browserVersion')} ({paths[0]}), chromedriver "
        f"{driver.capabilities.get('chrome', {}).get('chromedriverVersion', '?').split()[0]}"
    )
    yield driver
    driver.quit()


def _open(browser, path) -> float:
    """Opens the page, returns the seconds until it is drawn, checks it drew without errors."""
    browser.get_log("browser")  # drop what earlier pages logged
    start = time.perf_counter()
    browser.get(path.as_uri())
    from selenium.webdriver.support.ui import WebDriverWait

    WebDriverWait(browser, 30).until(
        lambda d: d.execute_script("return document.body.dataset.ready") == "true"
    )
    seconds = time.perf_counter() - start
    _assert_no_errors(browser)
    return seconds


def _assert_no_errors(browser) -> None:
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def _canvas_pixels(browser, element_id: str = "heatmap") -> dict:
    return browser.execute_script(
        """
        const canvas = document.getElementById(arguments[0]);
        const data = canvas.getContext("2d").getImageData(0, 0, canvas.width, canvas.height).data;
        const colours = new Set();
        for (let i = 0; i < data.length; i += 4) colours.add((data[i] << 16) | (data[i + 1] << 8) | data[i + 2]);
        const box = canvas.getBoundingClientRect();
        return {width: canvas.width, height: canvas.height, colours: colours.size,
                left: +canvas.dataset.left, top: +canvas.dataset.top, cell: +canvas.dataset.cell,
                cssWidth: box.width, cssHeight: box.height, x: box.left, y: box.top};
        """,
        element_id,
    )


def _pixel(browser, element_id: str, x: float, y: float) -> list[int]:
    return browser.execute_script(
        "const c = document.getElementById(arguments[0]);"
        "return Array.from(c.getContext('2d').getImageData(arguments[1], arguments[2], 1, 1).data);",
        element_id,
        int(x),
        int(y),
    )


def _hover_cell(browser, row: int, col: int) -> None:
    """Moves the mouse to the centre of a cell, relative to the canvas's centre."""
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By

    canvas = browser.find_element(By.ID, "heatmap")
    box = _canvas_pixels(browser)
    x = box["left"] + (col + 0.5) * box["cell"] - box["cssWidth"] / 2
    y = box["top"] + (row + 0.5) * box["cell"] - box["cssHeight"] / 2
    ActionChains(browser).move_to_element_with_offset(canvas, round(x), round(y)).perform()


def _hover_info(browser) -> dict:
    return browser.execute_script(
        "const e = document.getElementById('hover-info');"
        "return {text: e.textContent, query: e.dataset.query, key: e.dataset.key, weight: e.dataset.weight};"
    )


def test_the_page_renders_and_hovering_a_cell_shows_its_weight(browser, tmp_path):
    page = write_page(tmp_path / "index.html", [_small_example()], title="small", summary={"n": 1})
    seconds = _open(browser, page.path)
    print(f"small page drawn in {seconds:.2f} s")
    assert browser.title == "small"
    box = _canvas_pixels(browser)
    assert box["width"] > 0 and box["height"] > 0
    assert box["colours"] >= 5  # white, label ink, and the map's colours
    # The largest weight (0.7, query 1, key 2) is drawn in the colour map's last colour.
    x = box["left"] + 2.5 * box["cell"]
    y = box["top"] + 1.5 * box["cell"]
    top_colour = list(bytes.fromhex(html_page._colormap_hex())[-3:])
    assert _pixel(browser, "heatmap", x, y)[:3] == top_colour
    _hover_cell(browser, 1, 2)
    info = _hover_info(browser)
    assert (info["query"], info["key"], info["weight"]) == ("1", "2", "0.7000")
    assert "query 1 \u201cy\u201d \u2192 key 2 \u201cc\u201d: 0.7000" == info["text"]
    _hover_cell(browser, 0, 0)
    assert _hover_info(browser)["weight"] == "0.5000"
    _assert_no_errors(browser)


def test_tricky_labels_reach_the_page_unchanged(browser, tmp_path):
    title = '</title> 日本 עברית & "q"'
    page = write_page(tmp_path / "index.html", [_tricky_example()], title=title)
    _open(browser, page.path)
    from selenium.webdriver.common.by import By

    assert browser.title == title
    example = _tricky_example()
    assert browser.find_element(By.ID, "reference-text").text == example.reference
    assert browser.find_element(By.ID, "hypothesis-text").text == example.hypothesis
    labels = browser.execute_script(
        "return JSON.parse(document.getElementById('attnx-data').textContent).examples[0].source"
    )
    assert labels == TRICKY
    for col in (3, 5, 6, 7, 8):  # </script>, CJK, Hebrew, Arabic, emoji
        _hover_cell(browser, 2, col)
        info = _hover_info(browser)
        assert info["key"] == str(col)
        assert f"key {col} \u201c{TRICKY[col]}\u201d" in info["text"]
    _hover_cell(browser, 0, 10)  # a space is shown as a visible space
    assert "key 10 \u201c\u2423\u201d" in _hover_info(browser)["text"]
    _assert_no_errors(browser)


@pytest.mark.parametrize("with_image", [True, False], ids=["image", "grid-only"])
def test_hovering_a_target_token_shows_its_weights_over_the_image(browser, tmp_path, with_image):
    from selenium.webdriver import ActionChains
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    example = _spatial_example(_png_base64() if with_image else None)
    page = write_page(tmp_path / "index.html", [example], title="spatial")
    _open(browser, page.path)
    token = browser.find_element(By.CSS_SELECTOR, '.query-token[data-index="1"]')
    ActionChains(browser).move_to_element(token).perform()
    WebDriverWait(browser, 10).until(lambda d: "cat" in _hover_info(d)["text"])
    info = _hover_info(browser)
    assert info["text"].startswith("query 1 \u201ccat\u201d over the 3 x 4 grid: max 0.8900")
    assert "at cell (1, 2) \u201c(1,2)\u201d" in info["text"]
    grid = _canvas_pixels(browser, "grid-canvas")
    assert grid["width"] > 0 and grid["height"] > 0
    cell_w, cell_h = grid["width"] / 4, grid["height"] / 3
    looked_at = _pixel(browser, "grid-canvas", 2.5 * cell_w, 1.5 * cell_h)
    elsewhere = _pixel(browser, "grid-canvas", 0.5 * cell_w, 0.5 * cell_h)
    if with_image:
        # A spotlight over the image: clear where 'cat' looks, dark elsewhere.
        assert looked_at[3] == 0 and elsewhere[3] > 150
    else:
        colours = bytes.fromhex(html_page._colormap_hex())
        assert looked_at[:3] == list(colours[-3:]) and elsewhere[:3] == list(colours[:3])
    _assert_no_errors(browser)


def test_a_map_not_embedded_is_named_on_the_page(browser, tmp_path):
    from selenium.webdriver.common.by import By

    page = write_page(tmp_path / "index.html", [_small_example()], title="t", max_map_cells=10)
    _open(browser, page.path)
    assert "decoder/layer_0/cross_attention" in browser.find_element(By.ID, "omitted").text
    message = browser.find_element(By.ID, "map-message")
    assert message.is_displayed()
    assert "The map decoder/layer_0/cross_attention, head mean (3 x 4) is not embedded" in (
        message.text
    )
    assert browser.execute_script("return document.getElementById('heatmap').width") == 0


def test_a_512_token_page_renders_within_seconds(browser, tmp_path):
    from selenium.webdriver.common.actions.action_builder import ActionBuilder

    example = _long_example()
    page = write_page(tmp_path / "index.html", [example], title="512 tokens")
    (entry,) = read_page_data(page.path)["examples"][0]["maps"]
    entry_weights = decode_weights(entry)
    seconds = _open(browser, page.path)
    print(f"512 x 512 page ({page.size_bytes:,} bytes) drawn in {seconds:.2f} s")
    assert seconds < 5.0
    box = _canvas_pixels(browser)
    assert box["width"] >= 512 and box["height"] >= 512 and box["colours"] > 20
    assert box["cell"] >= 1
    # The canvas is larger than its scrolling box: point at a cell in the viewport.
    row, col = 10, 20
    x = box["x"] + box["left"] + (col + 0.5) * box["cell"]
    y = box["y"] + box["top"] + (row + 0.5) * box["cell"]
    actions = ActionBuilder(browser)
    actions.pointer_action.move_to_location(round(x), round(y))
    actions.perform()
    info = _hover_info(browser)
    assert (info["query"], info["key"]) == (str(row), str(col))
    # Shown with no digit finer than the row's quantisation step: within a few steps.
    step = (entry["hi"][row] - entry["lo"][row]) / html_page.LEVELS
    assert float(info["weight"]) == pytest.approx(entry_weights[row, col], abs=6 * step)
    assert float(info["weight"]) == pytest.approx(example.maps[0].weights[row, col], abs=6 * step)
    _assert_no_errors(browser)
