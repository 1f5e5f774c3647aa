"""Opt-in: the shipped toy model inside a real AUTOMATIC1111 WebUI (v1.10.x) on the CPU.

The toy model is exported with ``export-a1111`` into a private WebUI data folder (see ``webui.py``; set
``EMBTRAIN_WEBUI_DIR`` and ``EMBTRAIN_WEBUI_PYTHON``). The WebUI's own txt2img must draw what a prompt says about as
well as diffusers does with the same model (the export is faithful, and the host's CLIP, sampler and VAE read it as
we trained it), and an embedding trained through ``/embtrain/v1`` on photos of a held-out shape must make the
WebUI draw that shape when its trigger is in the prompt.
"""

from __future__ import annotations

import base64
import io
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.webui import MISSING, PYTHON, WEBUI, Client, running_webui, wait_finished

pytest.importorskip("diffusers")

from embedding_trainer.toyworld import base_model, learning, world  # noqa: E402
from embedding_trainer.toyworld.judges import load_judges  # noqa: E402

SHIPPED = learning.SHIPPED_MODEL
pytestmark = [
    pytest.mark.skipif(not (WEBUI and PYTHON), reason=MISSING),
    pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason=f"no shipped toy model in {SHIPPED}"),
]

#: How the WebUI samples: the settings ``base_model.sample`` uses (DDIM, 25 steps, guidance 4).
SAMPLING = {"steps": 25, "cfg_scale": 4.0, "width": 64, "height": 64, "sampler_name": "DDIM"}
PROMPTS = 24


@pytest.fixture(scope="module")
def webui(tmp_path_factory: pytest.TempPathFactory):
    data = tmp_path_factory.mktemp("webui-data-toy")
    with running_webui(data, tmp_path_factory.mktemp("models"), with_ui=False, model=SHIPPED) as base:
        client = Client(base)
        client.data = data
        yield client


def txt2img(client: Client, prompt: str, count: int, seed: int) -> np.ndarray:
    body = {"prompt": prompt, "negative_prompt": "", "batch_size": count, "seed": seed, **SAMPLING}
    status, reply = client.request("POST", "/sdapi/v1/txt2img", body)
    assert status == 200, reply
    images = [Image.open(io.BytesIO(base64.b64decode(b))).convert("RGB") for b in reply["images"][:count]]
    return np.stack([np.asarray(image) for image in images])


def judged_rates(images: np.ndarray, expected: list[dict[str, str]]) -> dict[str, float]:
    verdicts = base_model.judge_images(images)
    assert verdicts is not None
    return {
        attribute: float(np.mean([v[attribute] == e[attribute] for v, e in zip(verdicts, expected)]))
        for attribute in base_model.JUDGED
    }


def test_webui_txt2img_draws_what_the_prompt_says_as_diffusers_does(webui: Client) -> None:
    plan = base_model.Plan()
    exclude = {c for variants in base_model.training_captions(plan) for c in variants}
    cases = base_model.evaluation_prompts(PROMPTS, seed=5, exclude=exclude)
    expected = [case.expected for case in cases]
    in_webui = np.concatenate([txt2img(webui, case.prompt, 1, seed=i) for i, case in enumerate(cases)])
    model = base_model.load_model(SHIPPED)
    in_diffusers = base_model.sample(model, [case.prompt for case in cases], seed=0)
    webui_rates, diffusers_rates = judged_rates(in_webui, expected), judged_rates(in_diffusers, expected)
    print(json.dumps({"webui": webui_rates, "diffusers": diffusers_rates}))
    for attribute in base_model.JUDGED:
        # 24 prompts: one image more or less is 4 points; the sampler's noise differs between the two.
        assert webui_rates[attribute] >= diffusers_rates[attribute] - 0.2, (attribute, webui_rates, diffusers_rates)
    assert webui_rates["colour"] >= 0.8 and webui_rates["background"] >= 0.8, webui_rates


def test_an_embedding_trained_in_the_webui_draws_the_held_out_shape(webui: Client, tmp_path: Path) -> None:
    concept = world.HELD_OUT_CONCEPTS["heart"]
    photos = tmp_path / "photos"
    learning.write_user_photos(concept, photos, count=4)
    body = {
        "name": learning.TRIGGER,
        "images": str(photos),
        "template": str(learning.concept_template(concept, tmp_path)),
        "resolution": world.IMAGE_SIZE,
        "max_steps": 150,
        "seed": 0,
    }
    status, reply = webui.request("POST", "/embtrain/v1/runs", body)
    assert status == 200, reply
    run = wait_finished(webui, reply["id"], timeout=900)
    assert run["state"] == "finished", run["error"]
    prompt = world.reconstruction_prompts(concept, learning.TRIGGER)[0].prompt
    with_trigger = txt2img(webui, prompt, 8, seed=1)
    generic = txt2img(webui, "a photo of a shape", 8, seed=1)
    shows = load_judges().shows
    hearts, baseline = shows(with_trigger, concept.attributes).mean(), shows(generic, concept.attributes).mean()
    print(f"hearts with the trigger {hearts:.2f}, with 'a photo of a shape' {baseline:.2f}")
    assert hearts >= 0.5 and hearts > baseline + 0.25, (hearts, baseline)
