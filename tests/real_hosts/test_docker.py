"""The Docker images, built and run (opt-in: ``EMBTRAIN_DOCKER_TEST=1`` and a running Docker daemon).

Builds with the legacy builder and ``--network host``. Where no image registry or GitHub is reachable, give a local
Debian bookworm base in ``EMBTRAIN_DOCKER_BASE`` (made with debootstrap, as ``../shared/reference/environment.md``
says) and a local stand-in for GitHub and PyPI in ``EMBTRAIN_DOCKER_SOURCES``: a folder with the source archives
the WebUI image fetches, laid out as GitHub serves them (``<owner>/<repo>/archive/<ref>.tar.gz``), and a
``wheels/`` folder with every wheel both images install (for the WebUI: ``pip wheel -r requirements_versions.txt
torch==2.1.2 torchvision==0.16.2 setuptools==69.5.1 wheel ftfy regex tqdm packaging``; for the trainer:
``torch==2.13.0 -r docker/requirements-trainer.txt``). The test serves that folder on a loopback port and passes it
as the ``GITHUB`` and ``PIP_OPTIONS`` build arguments. Torch is the images' default (the WebUI's: PyPI's CUDA build),
run on the CPU here: ``--gpus all`` is not run (no GPU, no NVIDIA runtime); everything else is the GPU path.
"""

from __future__ import annotations

import contextlib
import functools
import http.server
import json
import os
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TRAINER_IMAGE = "embedding-trainer:test"
WEBUI_IMAGE = "embedding-trainer-webui:test"

pytestmark = pytest.mark.skipif(
    os.environ.get("EMBTRAIN_DOCKER_TEST") != "1", reason="set EMBTRAIN_DOCKER_TEST=1 to build and run the images"
)


def docker(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # one line per wheel is noise
        pass


@pytest.fixture(scope="module")
def build_args() -> Iterator[list[str]]:
    """The build arguments for a local base and local sources; skips without a daemon."""
    if not shutil.which("docker") or docker("info", timeout=30).returncode != 0:
        pytest.skip("no Docker daemon")
    args = []
    if os.environ.get("EMBTRAIN_DOCKER_BASE"):
        args += ["--build-arg", f"BASE_IMAGE={os.environ['EMBTRAIN_DOCKER_BASE']}"]
    sources = os.environ.get("EMBTRAIN_DOCKER_SOURCES")
    if not sources:
        yield args
        return
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", free_port()), functools.partial(QuietFiles, directory=sources)
    )
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}"
    try:
        yield args + [
            "--build-arg",
            f"GITHUB={base}",
            "--build-arg",
            f"PIP_OPTIONS=--no-index --find-links {base}/wheels/",
        ]
    finally:
        server.shutdown()


def build(dockerfile: str, tag: str, build_args: list[str]) -> str:
    started = time.perf_counter()
    built = subprocess.run(
        ["docker", "build", "--network", "host", "-f", dockerfile, *build_args, "-t", tag, "."],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=3600,
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    # Nothing of the build machine is baked in: the local sources' address and paths stay in the build stage.
    history = docker("history", "--no-trunc", "--format", "{{.CreatedBy}}", tag).stdout
    environment = docker("image", "inspect", "--format", "{{.Config.Env}}", tag).stdout
    for local in ("127.0.0.1", str(ROOT), "/wheels"):
        assert local not in history + environment, (local, history)
    size = docker("image", "inspect", "--format", "{{.Size}}", tag).stdout.strip()
    print(f"\nbuilt {tag} in {time.perf_counter() - started:.0f} s, {int(size) / 1e9:.2f} GB")
    return tag


@pytest.fixture(scope="module")
def trainer_image(build_args: list[str]) -> str:
    return build("docker/trainer.Dockerfile", TRAINER_IMAGE, build_args)


@pytest.fixture(scope="module")
def webui_image(build_args: list[str]) -> str:
    return build("docker/webui.Dockerfile", WEBUI_IMAGE, build_args)


def test_the_trainer_image_runs_the_demo_as_a_user_and_inspects_a_file_from_a_volume(trainer_image, tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    out.chmod(0o777)  # the image's user (uid 1000) writes here
    started = time.perf_counter()
    run = docker("run", "--rm", "--network", "none", "-v", f"{out}:/home/trainer/demo-output", trainer_image, "demo")
    print(f"demo in the container: {time.perf_counter() - started:.0f} s")
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "judged 'heart': reconstruction 0% -> " in run.stdout + run.stderr
    assert (out / "scores.json").is_file() and (out / "grid.png").is_file()
    assert docker("run", "--rm", trainer_image, "id", "-u", timeout=60).returncode != 0  # the entrypoint is the CLI
    user = docker("run", "--rm", "--entrypoint", "id", trainer_image, "-u", timeout=60)
    assert user.stdout.strip() == "1000"  # not root

    inspected = docker(
        "run",
        "--rm",
        "--network",
        "none",
        "-v",
        f"{out}:/data:ro",
        trainer_image,
        "inspect",
        "/data/embeddings/zyx-thing.safetensors",
        timeout=120,
    )
    assert inspected.returncode == 0, inspected.stderr
    assert "family: sd1" in inspected.stdout + inspected.stderr


def test_the_trainer_image_runs_the_same_torchrun_command(trainer_image, tmp_path):
    """Data-parallel in the container: torchrun (in the image's environment) with 2 gloo processes on the CPU."""
    from tests.helpers import make_images

    data = tmp_path / "data"
    shutil.copytree(ROOT / "embedding_trainer/toyworld/weights/base-model", data / "model")
    make_images(data / "images", count=4)
    data.chmod(0o777)  # the image's user (uid 1000) writes here
    # The host's network: torchrun's processes reach its store by the container's hostname, which a container on
    # Docker's default bridge resolves too, but one without a network (--network none; no bridge here) does not.
    run = docker(
        "run",
        "--rm",
        "--network",
        "host",
        "-v",
        f"{data}:/data",
        "--entrypoint",
        "torchrun",
        trainer_image,
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "embedding_trainer",
        "train",
        "--model",
        "/data/model",
        "--images",
        "/data/images",
        "--name",
        "dock-cat",
        "--max-steps",
        "5",
        "--batch-size",
        "4",
        "--output-dir",
        "/data/out",
        "--run-dir",
        "/data/run",
        "--device",
        "cpu",
        timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode == 0, output[-3000:]
    assert "[process 0] finished after 5 steps" in output and "in 2 processes" in output
    assert (data / "out/dock-cat.safetensors").is_file()


@contextlib.contextmanager
def running_container(image: str, name: str, args: list[str]) -> Iterator[str]:
    docker("rm", "-f", name, timeout=60)
    started = docker("run", "-d", "--name", name, *args, timeout=120)
    assert started.returncode == 0, started.stderr
    try:
        yield name
    finally:
        logs = docker("logs", "--tail", "40", name, timeout=60)
        print(logs.stdout[-3000:] + logs.stderr[-3000:])
        docker("rm", "-f", name, timeout=120)


def wait_healthy(name: str, timeout: float) -> float:
    started = time.perf_counter()
    while time.perf_counter() - started < timeout:
        state = docker("inspect", "--format", "{{.State.Status}} {{.State.Health.Status}}", name, timeout=30).stdout
        if state.split() == ["running", "healthy"]:
            return time.perf_counter() - started
        if state.split()[:1] != ["running"]:
            logs = docker("logs", "--tail", "60", name)
            raise AssertionError(f"{name} stopped: {logs.stdout[-3000:]}{logs.stderr[-3000:]}")
        time.sleep(2)
    raise AssertionError(f"{name} was not healthy after {timeout} s: {state}")


def test_the_webui_image_trains_through_the_api_and_the_trigger_works_in_txt2img(webui_image, tmp_path):
    pytest.importorskip("diffusers")  # to export the toy model as a WebUI checkpoint
    from embedding_trainer.embedding_file import file_sha256
    from embedding_trainer.tools.export_a1111 import export_a1111
    from embedding_trainer.toyworld import learning, world
    from tests.webui import Client, ti_hashes, wait_finished

    # The volumes: the WebUI's data folder with models, embeddings, outputs and run folders; the user's photos.
    data, photos = tmp_path / "data", tmp_path / "photos"
    for folder in ("models/Stable-diffusion", "embeddings", "outputs", "embtrain-runs"):
        (data / folder).mkdir(parents=True)
    checkpoint = export_a1111(learning.SHIPPED_MODEL, data / "models" / "Stable-diffusion" / "toy").checkpoint
    # The exported yaml names its tokenizer folder by absolute path: the path the container sees.
    yaml = checkpoint.with_suffix(".yaml")
    yaml.write_text(yaml.read_text(encoding="utf-8").replace(str(data), "/data"), encoding="utf-8")
    (data / "config.json").write_text('{"show_progress_type": "Approx cheap"}', encoding="utf-8")  # offline previews
    concept = world.HELD_OUT_CONCEPTS["heart"]
    learning.write_user_photos(concept, photos, count=4)
    template = learning.concept_template(concept, photos)
    for path in [data, *data.rglob("*"), photos]:
        path.chmod(0o777 if path.is_dir() else 0o666)  # the image's user (uid 1000) owns nothing here

    port = free_port()
    args = [
        "--network",
        "host",
        "-e",
        f"WEBUI_PORT={port}",
        "-e",
        "HF_HUB_OFFLINE=1",
        "-e",
        "TRANSFORMERS_OFFLINE=1",
        "-v",
        f"{data}:/data",
        "-v",
        f"{photos}:/photos:ro",
        webui_image,
        # The CPU stand-ins for --gpus all: the CUDA build of torch runs on the CPU in full precision.
        "--use-cpu",
        "all",
        "--no-half",
        "--precision",
        "full",
        "--skip-torch-cuda-test",
        "--no-download-sd-model",
        "--ckpt",
        f"/data/models/Stable-diffusion/{checkpoint.name}",
    ]
    with running_container(webui_image, "embtrain-webui-test", args) as name:
        print(f"healthy after {wait_healthy(name, timeout=600):.0f} s")
        assert docker("exec", name, "id", "-u", timeout=60).stdout.strip() == "1000"  # not root
        client = Client(f"http://127.0.0.1:{port}")
        body = {
            "name": learning.TRIGGER,
            "images": "/photos",
            "template": f"/photos/{template.name}",
            "resolution": world.IMAGE_SIZE,
            "max_steps": 60,
            "seed": 0,
        }
        started = time.perf_counter()
        status, reply = client.request("POST", "/embtrain/v1/runs", body)
        assert status == 200, reply
        run = wait_finished(client, reply["id"], timeout=900)
        print(f"60 steps through /embtrain/v1 in {time.perf_counter() - started:.0f} s")
        assert run["state"] == "finished", run["error"]
        embedding = data / "embeddings" / f"{learning.TRIGGER}.safetensors"
        assert embedding.is_file()
        status, listed = client.request("GET", "/sdapi/v1/embeddings")
        assert learning.TRIGGER in listed["loaded"], listed
        prompt = f"a photo of a {learning.TRIGGER}"
        status, reply = client.request(
            "POST",
            "/sdapi/v1/txt2img",
            {
                "prompt": prompt,
                "steps": 4,
                "width": 64,
                "height": 64,
                "sampler_name": "Euler",
                "save_images": True,
            },
        )
        assert status == 200, reply
        infotext = json.loads(reply["info"])["infotexts"][0]
        assert f"{learning.TRIGGER}: {file_sha256(embedding)[:12]}" in ti_hashes(infotext), infotext
    # The container is gone; what it made is on the volumes.
    assert embedding.is_file()
    assert list((data / "embtrain-runs").iterdir()), "no run folder"
    assert list((data / "outputs").rglob("*.png")), "no txt2img image in outputs"
