"""torch.distributed: data-parallel training and job files under a real ``torchrun`` with 2 gloo processes on the CPU.

Every launch is bounded in time (``LAUNCH_TIMEOUT_S``). The 2-process runs are compared with one process training the
same global batch: the vectors agree within ``VECTOR_TOLERANCE`` (see there for why they are not bit-identical).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from embedding_trainer.distributed import Processes
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.errors import ConfigError
from embedding_trainer.losses import denoising_loss
from embedding_trainer.run_state import find_state, load_state
from embedding_trainer.standalone.cli import main
from embedding_trainer.standalone.job_files import load_jobs
from tests.helpers import make_images, train_args

#: Each torchrun launch must end within this (a 2-process run here takes 6-10 s; the killed run is stopped sooner).
LAUNCH_TIMEOUT_S = 120
#: Two processes sum their shares' gradients and losses in another order than one process sums a batch, and fp32
#: addition is not associative: each sum differs in its last bits (relative 6e-8). AdamW divides each gradient by its
#: running RMS, so such relative differences pass into the steps unchanged rather than growing; over a few steps the
#: vectors (coordinates ~0.1 in the tiny model's table) differ by ~1e-7. 1e-5 leaves room for other CPUs' kernels.
VECTOR_TOLERANCE = 1e-5


def torchrun(*args: str, cwd: Path, processes: int = 2, **popen: object) -> subprocess.Popen:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc-per-node={processes}",
        "-m",
        "embedding_trainer",
        *args,
    ]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        command, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **popen
    )


def finish(process: subprocess.Popen, timeout: float = LAUNCH_TIMEOUT_S) -> tuple[int, str]:
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        pytest.fail(f"torchrun did not end within {timeout} s:\n{output}")
    return process.returncode, output


def run_args(model: Path, images: Path, root: Path, *extra: str) -> list[str]:
    """A short CPU run's ``train`` arguments, quiet (each caller gives its own ``--max-steps``)."""
    return train_args(model, images, root, "--device", "cpu", "--quiet", *extra)


def vectors(path: Path) -> dict[str, torch.Tensor]:
    return load_embedding(path).vectors


def assert_close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert a[key].shape == b[key].shape
        difference = (a[key].float() - b[key].float()).abs().max().item()
        assert difference <= VECTOR_TOLERANCE, f"{key}: the vectors differ by {difference}"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    make_images(tmp_path / "images", count=5)
    return tmp_path / "images"


# -- without processes ----------------------------------------------------------------------------------------------
def test_shares_split_every_batch_into_contiguous_rows():
    for world in (1, 2, 3, 4):
        for count in range(0, 9):
            shares = [Processes(rank, world).share(count) for rank in range(world)]
            rows = [i for share in shares for i in range(count)[share]]
            assert rows == list(range(count))
            sizes = [len(range(count)[share]) for share in shares]
            assert max(sizes) - min(sizes) <= 1


def test_share_losses_add_up_to_the_batch_mean():
    prediction, target = torch.randn(5, 4, 8, 8), torch.randn(5, 4, 8, 8)
    weights = torch.rand(5)
    whole = denoising_loss(prediction, target, weights=weights)
    parts = [Processes(rank, 2).share(5) for rank in range(2)]
    summed = sum(denoising_loss(prediction[s], target[s], weights=weights[s], batch_size=5) for s in parts)
    assert torch.allclose(whole, summed, rtol=1e-6)


def test_device_per_process(monkeypatch):
    alone = Processes()
    assert alone.device("cuda:1") == "cuda:1"  # one process: as asked
    second = Processes(rank=1, world_size=2, local_rank=1)
    assert second.device("cpu") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert second.device("auto") == "cpu"
    with pytest.raises(ConfigError, match="local rank"):
        second.device("cuda:0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert second.device("auto") == "cuda:1"
    with pytest.raises(ConfigError, match="nproc-per-node 4"):
        Processes(rank=5, world_size=8, local_rank=5).device("cuda")


def test_job_file_lines_are_checked_one_by_one(tmp_path: Path, images: Path):
    lines = [
        "# a comment, then a blank line",
        "",
        json.dumps({"name": "a", "images": str(images)}),
        "{not json",
        json.dumps({"name": "b", "images": str(images), "num_vectors": "four"}),
        json.dumps(["a", "list"]),
        json.dumps({"name": "a", "images": str(images)}),  # the same files as line 3
        json.dumps({"name": "c", "images": str(images), "model": "other-model", "max_steps": 9}),
        json.dumps({"images": str(images)}),
    ]
    path = tmp_path / "jobs.jsonl"
    path.write_text("\n".join(lines), encoding="utf-8")
    jobs = load_jobs(path, {"max_steps": 5, "output_dir": str(tmp_path / "out")}, "base-model")
    assert [job.line for job in jobs] == [3, 4, 5, 6, 7, 8, 9]
    good = {job.line: job for job in jobs if job.config is not None}
    assert sorted(good) == [3, 8]
    assert good[3].model == "base-model" and good[3].config.max_steps == 5
    assert good[8].model == "other-model" and good[8].config.max_steps == 9  # a job's own fields win
    errors = {job.line: job.error for job in jobs if job.config is None}
    assert "line 4 is not JSON" in errors[4]
    assert "num_vectors" in errors[5] and "expected int" in errors[5]
    assert "not an object" in errors[6]
    assert "same files as line 3" in errors[7]
    assert "name: is required" in errors[9]
    empty = tmp_path / "empty.jsonl"
    empty.write_text("# nothing\n", encoding="utf-8")
    with pytest.raises(ConfigError, match="holds no jobs"):
        load_jobs(empty, {}, "m")


# -- under torchrun --------------------------------------------------------------------------------------------------
@pytest.mark.slow  # a real torchrun launch
def test_two_processes_train_as_one_with_the_same_global_batch(tmp_path: Path, tiny_model_dirs, images: Path):
    """Batch 3 over 2 processes (uneven shares: 2 + 1 rows), 2 micro-batches per step, offset noise and min-SNR
    weights: the 2-process run writes the files one process writes, with the same vectors (within tolerance); a
    2-process resume continues it to the same end."""
    model = tiny_model_dirs("sd1")
    options = (
        "--batch-size",
        "3",
        "--grad-accum",
        "2",
        "--noise-offset",
        "0.05",
        "--min-snr-gamma",
        "5",
        "--eval-every",
        "2",
        "--save-every",
        "2",
    )
    assert main(run_args(model, images, tmp_path / "one", "--max-steps", "4", *options)) == 0
    code, output = finish(
        torchrun(*run_args(model, images, tmp_path / "two", "--max-steps", "4", *options), cwd=tmp_path)
    )
    assert code == 0, output
    one, two = tmp_path / "one", tmp_path / "two"
    assert_close(vectors(one / "out/my-cat.safetensors"), vectors(two / "out/my-cat.safetensors"))
    assert output.count("Training 'my-cat'") == 1  # process 0 reports, process 1 stays quiet
    # Process 0 wrote everything one process writes (and process 1 nothing more).
    listing = {p.relative_to(two / "run").as_posix() for p in (two / "run").rglob("*")}
    assert listing == {p.relative_to(one / "run").as_posix() for p in (one / "run").rglob("*")}
    # The same losses, written to 6 decimals: the last one may round the other way (the sums' order differs).
    logs = [[row.split(",") for row in (p / "run/loss.csv").read_text().splitlines()[1:]] for p in (one, two)]
    assert [row[0] for row in logs[0]] == [row[0] for row in logs[1]]  # the same steps
    assert [float(row[1]) for row in logs[0]] == pytest.approx([float(row[1]) for row in logs[1]], abs=2e-6)
    held_out = [float(load_embedding(p / "out/my-cat.safetensors").metadata["held_out_loss"]) for p in (one, two)]
    assert held_out[0] == pytest.approx(held_out[1], rel=1e-5)

    # Resume: two processes train 3 steps saving every step, then two processes continue from the save at step 2.
    half = tmp_path / "half"
    code, output = finish(
        torchrun(*run_args(model, images, half, *options, "--max-steps", "3", "--save-every", "1"), cwd=tmp_path)
    )
    assert code == 0, output
    (half / "out/my-cat.safetensors").unlink()  # the 3-step file; the resumed run writes the 4-step one
    code, output = finish(
        torchrun(
            "train", "--model", str(model), "--resume", str(half / "run"), "--max-steps", "4", "--quiet", cwd=tmp_path
        )
    )
    assert code == 0, output
    assert "resuming at step 2" in output
    assert_close(vectors(one / "out/my-cat.safetensors"), vectors(half / "out/my-cat.safetensors"))


@pytest.mark.slow  # a real torchrun launch
def test_two_processes_match_one_with_buckets_random_crops_and_masks(tmp_path: Path, tiny_model_dirs):
    """Aspect buckets (a short last batch leaves one process without rows), random crops (images encoded every
    step, each process only its rows) and alpha masks."""
    from PIL import Image

    images = tmp_path / "mixed"
    make_images(images, count=3, size=(96, 64), seed=1)
    make_images(tmp_path / "tall", count=2, size=(64, 96), seed=2)
    for i, path in enumerate(sorted((tmp_path / "tall").glob("*.png"))):
        picture = Image.open(path).convert("RGBA")
        picture.putalpha(Image.new("L", picture.size, 255 if i else 96))  # one image partly transparent
        picture.save(images / f"tall-{i}.png")
    model = tiny_model_dirs("sd1")
    options = (
        "--max-steps",
        "3",
        "--batch-size",
        "2",
        "--buckets",
        "--crop",
        "random",
        "--use-alpha-mask",
        "--flip",
        "--eval-every",
        "0",
    )
    assert main(run_args(model, images, tmp_path / "one", *options)) == 0
    code, output = finish(torchrun(*run_args(model, images, tmp_path / "two", *options), cwd=tmp_path))
    assert code == 0, output
    assert_close(vectors(tmp_path / "one/out/my-cat.safetensors"), vectors(tmp_path / "two/out/my-cat.safetensors"))


@pytest.mark.slow  # a real torchrun launch
def test_an_error_in_one_process_ends_every_process_with_its_reason(tmp_path: Path, tiny_model_dirs):
    """One image's caption is too long for the trigger's vectors: whichever process draws it fails, and the other
    says which process failed instead of waiting for it."""
    images = tmp_path / "images"
    make_images(images, count=4)
    (images / "02.txt").write_text(" ".join(["square"] * 90), encoding="utf-8")
    template = tmp_path / "template.txt"
    template.write_text("[filewords], a photo of [name]\n", encoding="utf-8")
    model = tiny_model_dirs("sd1")
    launcher = torchrun(
        *run_args(
            model,
            images,
            tmp_path,
            "--max-steps",
            "20",
            "--batch-size",
            "2",
            "--eval-every",
            "0",
            "--template",
            str(template),
        ),
        cwd=tmp_path,
    )
    code, output = finish(launcher)
    assert code != 0
    assert "is too long" in output, output  # the process that drew the image: the reason
    assert re.search(r"process [01] failed during step \d+; its own error says why", output), output
    assert "lost the other processes" not in output  # it did not have to notice a dead peer


@pytest.mark.slow  # a real torchrun launch
def test_a_stop_asked_of_one_process_stops_both_after_the_same_step(tmp_path: Path, tiny_model_dirs, images: Path):
    model = tiny_model_dirs("sd1")
    launcher = torchrun(*run_args(model, images, tmp_path, "--max-steps", "5000", "--batch-size", "2"), cwd=tmp_path)
    worker = _wait_for_worker(launcher, rank=1, ready=tmp_path / "run/loss.csv", rows=3)
    os.kill(worker, signal.SIGTERM)  # what torchrun sends when another process fails; Ctrl-C votes the same way
    code, output = finish(launcher)
    assert code != 0  # a stopped run did not finish (exit 130), and torchrun says so
    assert "[process 0] stopped at step" in output  # process 1 was asked; process 0 reports
    assert "torchrun --standalone --nproc-per-node 2 -m embedding_trainer train" in output
    assert "[process 1]" not in output  # the processes that only compute stay quiet
    state = find_state(tmp_path / "run")
    step = int(load_state(state)[1]["step"])
    assert 3 <= step < 5000
    embedding = load_embedding(tmp_path / "out/my-cat.safetensors")
    assert embedding.step == step  # both processes stopped after the step that was saved: no hang, no mismatch


@pytest.mark.slow  # a real torchrun launch
def test_killing_one_process_ends_the_run_with_a_clear_error_and_keeps_what_was_saved(
    tmp_path: Path, tiny_model_dirs, images: Path
):
    model = tiny_model_dirs("sd1")
    args = run_args(model, images, tmp_path, "--max-steps", "5000", "--batch-size", "2", "--save-every", "5")
    launcher = torchrun(*args, cwd=tmp_path)
    worker = _wait_for_worker(launcher, rank=1, ready=tmp_path / "run/saves", rows=0)
    os.kill(worker, signal.SIGKILL)
    code, output = finish(launcher)
    assert code != 0
    assert "lost the other processes" in output, output  # process 0 says what happened
    assert "Last good embedding" in output and "Continue from the last save" in output
    saved = sorted((tmp_path / "run/saves").glob("*.state.safetensors"))
    assert saved
    last_good = load_embedding(tmp_path / "run/my-cat-last-good.safetensors")
    assert last_good.step >= int(load_state(saved[0])[1]["step"])
    assert not list(tmp_path.rglob("*.tmp"))  # no half-written file
    # The saves are whole: one process resumes the run from the last one and finishes it.
    state = find_state(tmp_path / "run")
    step = int(load_state(state)[1]["step"])
    assert (
        main(
            ["train", "--model", str(model), "--resume", str(tmp_path / "run"), "--max-steps", str(step + 2), "--quiet"]
        )
        == 0
    )
    assert load_embedding(tmp_path / "out/my-cat.safetensors").step == step + 2


@pytest.mark.slow  # a real torchrun launch
def test_a_job_file_spreads_over_two_processes_and_a_bad_job_does_not_stop_the_rest(
    tmp_path: Path, tiny_model_dirs, images: Path, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the jobs' run folders: runs/<name> in the current folder, as torchrun's
    model = tiny_model_dirs("sd1")
    out = tmp_path / "out"
    jobs = [
        {"name": "cat-a", "images": str(images)},
        {"name": "cat-b", "images": str(tmp_path / "no-such-folder")},  # fails when it starts
        {"name": "cat-c", "images": str(images), "num_vectors": 2, "max_steps": 4},
        {"name": "cat-d", "images": str(images), "learning_rate": "fast"},  # fails when the file is read
        {"name": "cat-e", "images": str(images), "init_text": "square"},
    ]
    job_file = tmp_path / "jobs.jsonl"
    job_file.write_text("\n".join(json.dumps(job) for job in jobs) + "\n", encoding="utf-8")
    defaults = (
        "--model",
        str(model),
        "--max-steps",
        "3",
        "--resolution",
        "64",
        "--device",
        "cpu",
        "--output-dir",
        str(out),
    )
    code, output = finish(torchrun("jobs", str(job_file), *defaults, cwd=tmp_path))
    assert code == 1, output  # some jobs failed
    summary = json.loads((tmp_path / "jobs.jsonl.summary.json").read_text())
    status = {job["name"]: job["status"] for job in summary["jobs"]}
    assert status == {
        "cat-a": "finished",
        "cat-b": "failed",
        "cat-c": "finished",
        "cat-d": "failed",
        "cat-e": "finished",
    }
    assert summary["processes"] == 2 and summary["counts"] == {"finished": 3, "failed": 2}
    assert {job["process"] for job in summary["jobs"]} == {0, 1}  # both processes took jobs
    errors = {job["name"]: job["error"] for job in summary["jobs"]}
    assert "no-such-folder" in errors["cat-b"] and "learning_rate" in errors["cat-d"]
    assert next(iter(load_embedding(out / "cat-c.safetensors").vectors.values())).shape[0] == 2  # its own options
    assert load_embedding(out / "cat-a.safetensors").step == 3  # the defaults
    assert "overall: 5 of 5 jobs done" in output
    assert "job 'cat-c' (line 3): step 4/4" in output  # progress per job
    assert "cat-b" in output and "failed" in output  # the summary table

    # Again, with the bad jobs mended: the finished ones are skipped, the mended ones run, in one process.
    jobs[1]["images"], jobs[3]["learning_rate"] = str(images), "0.005"
    job_file.write_text("\n".join(json.dumps(job) for job in jobs) + "\n", encoding="utf-8")
    finished_a = (out / "cat-a.safetensors").stat().st_mtime_ns
    assert main(["jobs", str(job_file), *defaults]) == 0
    summary = json.loads((tmp_path / "jobs.jsonl.summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["skipped", "finished", "skipped", "finished", "skipped"]
    assert (out / "cat-a.safetensors").stat().st_mtime_ns == finished_a


def _wait_for_worker(launcher: subprocess.Popen, rank: int, ready: Path, rows: int) -> int:
    """The pid of torchrun's worker of ``rank`` once ``ready`` exists (a file: with ``rows`` rows past its header)."""
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    while time.monotonic() < deadline:
        if launcher.poll() is not None:
            pytest.fail(f"torchrun ended early:\n{launcher.communicate()[0]}")
        if ready.is_dir() and any(ready.iterdir()) or (ready.is_file() and len(ready.read_text().splitlines()) > rows):
            for pid in _descendants(launcher.pid):
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
                if f"RANK={rank}".encode() in environ and b"LOCAL_RANK=" + str(rank).encode() in environ:
                    return pid
        time.sleep(0.05)
    launcher.kill()
    pytest.fail(f"no worker of rank {rank} with {ready} ready:\n{launcher.communicate()[0]}")


def _descendants(pid: int) -> list[int]:
    children = Path(f"/proc/{pid}/task/{pid}/children")
    found = [int(child) for child in children.read_text().split()] if children.exists() else []
    return found + [grandchild for child in found for grandchild in _descendants(child)]


@pytest.mark.slow  # a real torchrun launch
def test_a_stopped_job_file_keeps_every_job_and_goes_on_where_it_stopped(
    tmp_path: Path, tiny_model_dirs, images: Path, monkeypatch
):
    """Ctrl-C to torchrun stops the running jobs with a save; the summary says so; the same command again resumes
    them; a finished job whose settings changed is refused (its file would be replaced) until its line says
    overwrite."""
    monkeypatch.chdir(tmp_path)
    model = tiny_model_dirs("sd1")
    jobs = [{"name": f"cat-{x}", "images": str(images), "max_steps": 5000} for x in "ab"]
    jobs.append({"name": "cat-c", "images": str(images), "max_steps": 5000})
    job_file = tmp_path / "jobs.jsonl"
    job_file.write_text("\n".join(json.dumps(job) for job in jobs), encoding="utf-8")
    defaults = (
        "--model",
        str(model),
        "--resolution",
        "64",
        "--device",
        "cpu",
        "--save-every",
        "10",
        "--output-dir",
        "out",
    )
    launcher = torchrun("jobs", str(job_file), *defaults, cwd=tmp_path)
    deadline = time.monotonic() + LAUNCH_TIMEOUT_S
    logs = [tmp_path / f"runs/cat-{x}/loss.csv" for x in "ab"]
    while not all(log.is_file() and len(log.read_text().splitlines()) > 15 for log in logs):
        assert launcher.poll() is None and time.monotonic() < deadline, finish(launcher)[1]
        time.sleep(0.1)
    launcher.send_signal(signal.SIGINT)  # torchrun passes it on to every process
    code, output = finish(launcher)
    assert code != 0
    summary = json.loads((tmp_path / "jobs.jsonl.summary.json").read_text())
    status = {job["name"]: job["status"] for job in summary["jobs"]}
    assert status == {"cat-a": "stopped", "cat-b": "stopped", "cat-c": "not started"}, output
    steps = {job["name"]: job["steps"] for job in summary["jobs"]}

    # The same command, with fewer steps so it ends soon: the stopped jobs resume, the third starts.
    for job in jobs:
        job["max_steps"] = steps[job["name"]] + 2 if steps[job["name"]] else 3
    job_file.write_text("\n".join(json.dumps(job) for job in jobs), encoding="utf-8")
    assert main(["jobs", str(job_file), *defaults]) == 0
    summary = json.loads((tmp_path / "jobs.jsonl.summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["finished"] * 3
    assert [job["steps"] for job in summary["jobs"]] == [job["max_steps"] for job in jobs]
    for name in ("cat-a", "cat-b"):  # resumed, not started over: their loss logs go on from the stop
        rows = (tmp_path / f"runs/{name}/loss.csv").read_text().splitlines()[1:]
        assert [int(row.split(",")[0]) for row in rows] == list(range(1, steps[name] + 3))

    # A finished job with other settings: refused, named, until its line says overwrite.
    jobs[2]["num_vectors"] = 2
    job_file.write_text("\n".join(json.dumps(job) for job in jobs), encoding="utf-8")
    assert main(["jobs", str(job_file), *defaults]) == 1
    summary = json.loads((tmp_path / "jobs.jsonl.summary.json").read_text())
    assert [job["status"] for job in summary["jobs"]] == ["skipped", "skipped", "failed"]
    assert "finished earlier with other settings (num_vectors)" in summary["jobs"][2]["error"]
    assert '"overwrite": true' in summary["jobs"][2]["error"]
    jobs[2]["overwrite"] = True
    job_file.write_text("\n".join(json.dumps(job) for job in jobs), encoding="utf-8")
    assert main(["jobs", str(job_file), *defaults]) == 0
    assert next(iter(load_embedding(tmp_path / "out/cat-c.safetensors").vectors.values())).shape[0] == 2
