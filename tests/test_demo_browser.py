"""The demo in a real headless browser (Debian's chromium, installed here when missing): a model
trained in the test answers a question about an image from ``assets/`` in the chat tab (the
annotated image and the reasoning appear), the rollout viewer opens the run that training
logged, and the rewards playground scores a completion. Screenshots of each tab go to the test's
output folder."""

from __future__ import annotations

import shutil
import socket
import subprocess
from pathlib import Path

import pytest
import yaml

from vlreason.cli import main
from vlreason.data.synth import synthesize

webdriver = pytest.importorskip("selenium.webdriver")
from selenium.webdriver.chrome.service import Service  # noqa: E402
from selenium.webdriver.common.by import By  # noqa: E402
from selenium.webdriver.support.ui import WebDriverWait  # noqa: E402

ASSET = Path(__file__).resolve().parents[1] / "assets" / "demo" / "shapes.png"


@pytest.fixture(scope="module")
def chromium() -> tuple[str, str]:
    """Paths of chromium and chromedriver, installed with apt when they are missing."""
    if not (shutil.which("chromium") and shutil.which("chromedriver")):
        install = ["apt-get", "install", "-y", "-q", "chromium", "chromium-driver"]
        if subprocess.run(install, capture_output=True).returncode != 0:
            subprocess.run(["apt-get", "update", "-q"], capture_output=True, check=True)
            subprocess.run(install, capture_output=True, check=True)
    return shutil.which("chromium"), shutil.which("chromedriver")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """Runs folder with a short SFT -> GRPO run on 112 px grounding images (SFT long enough to
    write the think/answer format and boxes; GRPO logs rollouts with the HF engine)."""
    root = tmp_path_factory.mktemp("demo")
    data = synthesize("grounding", root / "data", n=32, seed=0, image_size=112, progress=False)
    config = {"output_dir": str(root / "runs" / "exp"), "data": {"train": str(data)},
              "model": {"name_or_path": "tiny-qwen2.5-vl", "freeze_vision": False},
              "logging": {"tensorboard": False, "progress": False},
              "stages": [{"kind": "sft", "optim": {"learning_rate": 2e-3, "batch_size": 8, "max_steps": 120},
                          "save": {"every": 0}},
                         {"kind": "grpo", "optim": {"learning_rate": 1e-4, "batch_size": 2, "max_steps": 2},
                          "rollout": {"num_generations": 2, "max_new_tokens": 48},
                          "rewards": {"iou": {}, "format": {"weight": 0.2}}, "save": {"every": 0}}]}
    path = root / "exp.yaml"
    path.write_text(yaml.safe_dump(config))
    assert main(["train", str(path)]) == 0
    return root / "runs"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def open_tab(driver, name: str) -> None:
    next(b for b in driver.find_elements(By.CSS_SELECTOR, "button[role=tab]") if b.text == name).click()


def test_the_demo_in_a_browser(chromium, trained, tmp_path):
    from vlreason.demo import launch

    port = free_port()
    app = launch(trained / "exp" / "sft" / "final", port=port, runs_root=trained, block=False)
    options = webdriver.ChromeOptions()
    options.binary_location = chromium[0]
    for argument in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1100"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=Service(chromium[1]), options=options)
    wait = WebDriverWait(driver, 120)
    try:
        driver.get(f"http://127.0.0.1:{port}/")
        question = wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#question textarea"))
        driver.find_element(By.CSS_SELECTOR, "#uploads input[type=file]").send_keys(str(ASSET))
        wait.until(lambda d: "shapes" in d.find_element(By.CSS_SELECTOR, "#uploads").get_attribute("innerHTML"))
        question.send_keys("Where is the red triangle? Answer with its bounding box [x1, y1, x2, y2].")
        driver.find_element(By.CSS_SELECTOR, "#ask").click()
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#annotated img"))  # the last update: boxes drawn
        answer = driver.find_element(By.CSS_SELECTOR, "#answer textarea").get_attribute("value")
        reasoning = driver.find_element(By.CSS_SELECTOR, "#reasoning textarea").get_attribute("value")
        assert answer.startswith("[") and "triangle" in reasoning
        driver.save_screenshot(str(tmp_path / "chat.png"))

        open_tab(driver, "Rollouts")  # the logged run opens with its first and last steps
        wait.until(lambda d: "grounding-0-" in d.find_element(By.CSS_SELECTOR, "#rollouts-left").text)
        wait.until(lambda d: d.find_elements(By.CSS_SELECTOR, "#curves img"))
        assert '"iou"' in driver.find_element(By.CSS_SELECTOR, "#rollouts-right").text
        driver.save_screenshot(str(tmp_path / "rollouts.png"))

        open_tab(driver, "Rewards")
        wait.until(lambda d: d.find_element(By.CSS_SELECTOR, "#completion textarea")).send_keys(
            "<think>upper left</think><answer>[1, 2, 30, 40]</answer>")
        driver.find_element(By.CSS_SELECTOR, "#truth textarea").send_keys('{"boxes": [[1, 2, 30, 50]]}')
        driver.find_element(By.CSS_SELECTOR, "#score").click()
        wait.until(lambda d: "format" in d.find_element(By.CSS_SELECTOR, "#scores").text)
        driver.save_screenshot(str(tmp_path / "rewards.png"))
    finally:
        driver.quit()
        app.close()
    assert all((tmp_path / f"{tab}.png").stat().st_size > 10_000 for tab in ("chat", "rollouts", "rewards"))
