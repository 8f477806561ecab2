"""The web page in a real headless Chromium: explain, see the highlights, steer a completion."""

from __future__ import annotations

import os
import shutil

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("selenium")

from _server import serving  # noqa: E402
from selenium import webdriver  # noqa: E402
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support import expected_conditions  # noqa: E402
from selenium.webdriver.support.ui import Select, WebDriverWait  # noqa: E402

from atman.render.palette import FOR_RGB  # noqa: E402
from atman.server import Limits, create_app  # noqa: E402

CHROMIUM = os.environ.get("ATMAN_CHROMIUM", "/usr/bin/chromium")
CHROMEDRIVER = shutil.which("chromedriver") or "/usr/bin/chromedriver"
BROWSER = os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)
NEEDS = "needs Chromium and its driver (Debian: apt-get install chromium chromium-driver)"
# CI installs Chromium and sets ATMAN_REQUIRE_BROWSER: there a missing browser fails the page tests
if not BROWSER and os.environ.get("ATMAN_REQUIRE_BROWSER"):
    raise RuntimeError(f"ATMAN_REQUIRE_BROWSER is set but {CHROMIUM} or {CHROMEDRIVER} is missing: "
                       f"the page test {NEEDS}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(not BROWSER, reason=NEEDS)]
FACTS = "Ada lives in Oslo. Bo lives in Rome. Ada lives in"


@pytest.fixture(scope="module")
def page(smollm2):
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1200,1400"):
        options.add_argument(argument)
    # the driver's path is given, so selenium never tries to download one
    browser = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    try:
        with serving(create_app({"smollm2": smollm2}, limits=Limits(max_tokens=16))) as base:
            browser.get(base + "/")
            yield browser
    finally:
        browser.quit()


def wait(browser, seconds=120):
    return WebDriverWait(browser, seconds)


def fill(browser, element_id: str, text: str) -> None:
    # set the value directly: send_keys would type a newline as Enter
    browser.execute_script("arguments[0].value = arguments[1];", browser.find_element(By.ID, element_id), text)


def test_explain_shows_the_prompt_coloured_by_relevance(page, tmp_path):
    wait(page).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 1)
    fill(page, "prompt", FACTS)
    fill(page, "target", " Oslo")
    Select(page.find_element(By.ID, "granularity")).select_by_value("sentence")
    Select(page.find_element(By.ID, "target-granularity")).select_by_value("token")
    page.find_element(By.ID, "explain").click()
    wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Explained"))
    units = page.find_elements(By.CSS_SELECTOR, "#highlighted .unit")
    assert [u.text for u in units] == ["Ada lives in Oslo.", "Bo lives in Rome.", "Ada lives in"]
    assert page.find_element(By.ID, "highlighted").text == FACTS
    scores = [float(u.get_attribute("data-score")) for u in units]
    assert max(scores) == scores[0] > 0
    assert units[0].get_attribute("title") == f"score {scores[0]:.4f} nats"
    # evidence for the target has the palette's colour for it
    assert "rgba({}, {}, {}".format(*FOR_RGB) in units[0].get_attribute("style")
    assert [t.text for t in page.find_elements(By.CSS_SELECTOR, "#targets button")] == [" Oslo"]
    page.save_screenshot(str(tmp_path / "explain.png"))


def test_explain_without_target_completes_first(page):
    fill(page, "target", "")
    Select(page.find_element(By.ID, "granularity")).select_by_value("word")
    Select(page.find_element(By.ID, "target-granularity")).select_by_value("token")
    fill(page, "max-tokens", "3")
    page.find_element(By.ID, "explain").click()
    wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Explained"))
    tabs = page.find_elements(By.CSS_SELECTOR, "#targets button")
    assert len(tabs) >= 2 and page.find_element(By.ID, "target").get_attribute("value")
    first = [u.get_attribute("data-score") for u in page.find_elements(By.CSS_SELECTOR, "#highlighted .unit")]
    tabs[1].click()
    assert tabs[1].get_attribute("aria-selected") == "true"
    second = [u.get_attribute("data-score") for u in page.find_elements(By.CSS_SELECTOR, "#highlighted .unit")]
    assert len(first) == len(second) == len(FACTS.split()) and first != second


def test_a_control_on_a_selected_span_steers_the_completion(page, tmp_path):
    fill(page, "prompt", FACTS)
    fill(page, "max-tokens", "2")
    area = page.find_element(By.ID, "prompt")
    start = FACTS.index("Bo lives in Rome.")
    page.execute_script("arguments[0].focus(); arguments[0].setSelectionRange(arguments[1], arguments[2]);",
                        area, start, start + len("Bo lives in Rome."))
    fill(page, "steer-factor", "0")
    page.find_element(By.ID, "add-control").click()
    assert page.find_element(By.CSS_SELECTOR, "#controls li").text.startswith('×0 on "Bo lives in Rome."')
    page.find_element(By.ID, "complete").click()
    wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Steered by 1"))
    plain = page.find_element(By.ID, "plain-completion").text
    steered = page.find_element(By.ID, "steered-completion").text
    assert plain.strip().startswith("Rome") and not steered.strip().startswith("Rome")
    page.save_screenshot(str(tmp_path / "steer.png"))


def test_the_page_asks_for_the_token_when_auth_is_on(page, smollm2):
    with serving(create_app({"smollm2": smollm2}, token="s3cret")) as base:
        page.get(base + "/")
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "needs a token"))
        assert page.find_element(By.ID, "token-label").is_displayed()
        page.find_element(By.ID, "token").send_keys("s3cret")
        page.find_element(By.ID, "prompt").click()  # leaving the field fires its change event
        wait(page).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 1)
        fill(page, "prompt", FACTS)
        fill(page, "target", " Oslo")
        Select(page.find_element(By.ID, "granularity")).select_by_value("sentence")
        page.find_element(By.ID, "explain").click()
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Explained"))
        assert len(page.find_elements(By.CSS_SELECTOR, "#highlighted .unit")) == 3


def test_an_image_explanation_is_laid_over_the_image(page, tmp_path):
    """A vision-language model: the page sends the chosen image before the text and colours its tiles."""
    import numpy as np

    from atman.evaluate.scenes import CAPTION_PREFIX, make_scene
    from atman.vision_language import load_vision_language

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "tiny-llava-scenes")
    scene = make_scene(np.random.default_rng(5), 2)
    picture = tmp_path / "scene.png"
    scene.image.save(picture)
    with serving(create_app({"tiny-llava-scenes": load_vision_language(fixture)},
                            limits=Limits(max_prompt_tokens=128))) as base:
        page.get(base + "/")
        wait(page).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 1)
        assert page.find_element(By.ID, "image-label").is_displayed()
        page.find_element(By.ID, "image").send_keys(str(picture))
        fill(page, "prompt", CAPTION_PREFIX)
        fill(page, "target", " " + scene.objects[0].name)
        Select(page.find_element(By.ID, "granularity")).select_by_value("word")
        Select(page.find_element(By.ID, "target-granularity")).select_by_value("complete")
        page.find_element(By.ID, "explain").click()
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Explained"))
        wait(page, 30).until(lambda b: b.find_element(By.ID, "image-canvas").get_attribute("data-tiles"))
        assert page.find_element(By.ID, "image-view").is_displayed()
        assert page.find_element(By.ID, "image-canvas").get_attribute("data-tiles") == "36"
        assert page.find_element(By.ID, "highlighted").text == CAPTION_PREFIX
        page.save_screenshot(str(tmp_path / "image.png"))


def test_citing_lights_up_the_sources_of_the_hovered_sentence(page, smollm2, tmp_path):
    from selenium.webdriver.common.action_chains import ActionChains

    with serving(create_app({"smollm2": smollm2}, limits=Limits(max_tokens=16))) as base:
        page.get(base + "/")
        wait(page).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 1)
        page.find_element(By.ID, "cite-run").click()
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Cited"))
        spans = page.find_elements(By.CSS_SELECTOR, "#cite-spans .cite-span")
        assert len(spans) == 2 and spans[0].text.startswith("They were founded in 1887.")
        sources = page.find_elements(By.CSS_SELECTOR, "#cite-view .cite-source")
        assert len(sources) == 4
        # the first sentence rests on the founding sentence: it carries the palette's colour for evidence
        assert "rgba({}, {}, {}".format(*FOR_RGB) in sources[0].get_attribute("style")
        # a source is named by its passage and its number there, as in the terminal; scores carry their unit
        assert spans[0].find_element(By.CSS_SELECTOR, "li").text.startswith("[1:1] ")
        assert sources[0].get_attribute("title").endswith(" nats")
        ActionChains(page).move_to_element(spans[1]).perform()
        assert "active" in spans[1].get_attribute("class")
        assert "rgba({}, {}, {}".format(*FOR_RGB) in sources[1].get_attribute("style")
        page.save_screenshot(str(tmp_path / "cite.png"))


CHAT = [
    {"role": "user", "content": "What is the weather in Oslo today?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_7", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": "Oslo: light snow, minus four degrees."},
]


def test_a_chat_shows_each_answer_sentence_with_its_sources(page, smollm2, tmp_path):
    import json

    from selenium.webdriver.common.action_chains import ActionChains

    with serving(create_app({"smollm2": smollm2}, limits=Limits(max_tokens=24))) as base:
        page.get(base + "/")
        wait(page).until(lambda b: len(Select(b.find_element(By.ID, "model")).options) == 1)
        # the example transcript ends with an answer: that answer is cited, sentence by sentence
        page.find_element(By.ID, "chat-run").click()
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Cited 2 sentence"))
        bubbles = page.find_elements(By.CSS_SELECTOR, "#chat-view .msg")
        assert [b.get_attribute("class") for b in bubbles] == [
            "msg system", "msg user", "msg assistant", "msg tool", "msg assistant answer"]
        sentences = page.find_elements(By.CSS_SELECTOR, "#chat-view .chat-sentence")
        assert [s.text.splitlines()[0] for s in sentences] == ["It is snowing lightly in Oslo.",
                                                               "It is minus four degrees."]
        # each sentence lists its sources under it, the tool result first, and lights it up in its message
        assert sentences[0].find_element(By.CSS_SELECTOR, "li").text.startswith("#3 tool call_7")
        tool = page.find_element(By.CSS_SELECTOR, '#chat-view .msg.tool .chat-source')
        assert tool.text == "Oslo: light snow, minus four degrees."
        assert "rgba({}, {}, {}".format(*FOR_RGB) in tool.get_attribute("style")
        ActionChains(page).move_to_element(sentences[1]).perform()
        assert "active" in sentences[1].get_attribute("class") and "active" not in sentences[0].get_attribute("class")
        assert "rgba({}, {}, {}".format(*FOR_RGB) in tool.get_attribute("style")
        page.save_screenshot(str(tmp_path / "chat.png"))
        # without an answer the model answers, streamed, and its sentences' sources arrive with it
        fill(page, "chat-messages", json.dumps(CHAT))
        page.find_element(By.ID, "chat-run").click()
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "Cited"))
        answer = page.find_element(By.ID, "chat-answer")
        assert "snow" in answer.text
        first = page.find_element(By.CSS_SELECTOR, "#chat-view .chat-sentence li")
        assert first.text.startswith("#2 tool call_7")
        # a transcript that is not JSON is said, not sent
        fill(page, "chat-messages", "[{")
        page.find_element(By.ID, "chat-run").click()
        wait(page).until(expected_conditions.text_to_be_present_in_element((By.ID, "status"), "not valid JSON"))
