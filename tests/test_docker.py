"""The Docker images, built and run (opt-in: ``EMBTRAIN_DOCKER_TEST=1`` and a running Docker daemon).

Builds with the legacy builder and ``--network host``. Where no image registry is reachable, give a local Debian
bookworm base in ``EMBTRAIN_DOCKER_BASE`` (e.g. made with debootstrap, as ``../shared/reference/environment.md``
says) and put the wheels in ``docker/wheels/`` with ``EMBTRAIN_DOCKER_PIP_OPTIONS="--no-index --find-links
/wheels"``. ``--gpus all`` is not run here: no GPU; everything else is the GPU path with a CPU torch wheel.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TRAINER_IMAGE = "embedding-trainer:test"

pytestmark = pytest.mark.skipif(
    os.environ.get("EMBTRAIN_DOCKER_TEST") != "1", reason="set EMBTRAIN_DOCKER_TEST=1 to build and run the images"
)


def docker(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["docker", *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def trainer_image() -> str:
    if not shutil.which("docker") or docker("info", timeout=30).returncode != 0:
        pytest.skip("no Docker daemon")
    build_args = []
    if os.environ.get("EMBTRAIN_DOCKER_BASE"):
        build_args += ["--build-arg", f"BASE_IMAGE={os.environ['EMBTRAIN_DOCKER_BASE']}"]
    if os.environ.get("EMBTRAIN_DOCKER_PIP_OPTIONS"):
        build_args += ["--build-arg", f"PIP_OPTIONS={os.environ['EMBTRAIN_DOCKER_PIP_OPTIONS']}"]
    started = time.perf_counter()
    built = subprocess.run(
        ["docker", "build", "--network", "host", "-f", "docker/trainer.Dockerfile", *build_args, "-t", TRAINER_IMAGE,
         "."],
        cwd=ROOT, capture_output=True, text=True, timeout=1800, env={**os.environ, "DOCKER_BUILDKIT": "0"},
    )  # fmt: skip
    assert built.returncode == 0, built.stdout[-3000:] + built.stderr[-3000:]
    size = docker("image", "inspect", "--format", "{{.Size}}", TRAINER_IMAGE).stdout.strip()
    print(f"\nbuilt {TRAINER_IMAGE} in {time.perf_counter() - started:.0f} s, {int(size) / 1e9:.2f} GB")
    return TRAINER_IMAGE


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

    inspected = docker("run", "--rm", "--network", "none", "-v", f"{out}:/data:ro", trainer_image, "inspect",
                       "/data/embeddings/zyx-thing.safetensors", timeout=120)  # fmt: skip
    assert inspected.returncode == 0, inspected.stderr
    assert "family: sd1" in inspected.stdout + inspected.stderr
