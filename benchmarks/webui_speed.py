"""Training speed inside a real AUTOMATIC1111 WebUI: ours against the WebUI's built-in trainer, in one process.

Opt-in, like the real-host test tier: ``EMBTRAIN_WEBUI_DIR`` names a v1.10.x checkout (with its ``repositories/``)
and ``EMBTRAIN_WEBUI_PYTHON`` the Python that runs it. The benchmark starts the WebUI itself (API only, CPU, fp32)
with the shipped toy model exported as its checkpoint, or attaches to a running one (``--url``; install the probe
first with ``--write-probe <webui>/extensions``). Then, in that one process:

1. a txt2img through ``/sdapi/v1/txt2img`` and a built-in training run, so other request threads have run torch;
2. for batch 1 and 4, alternating, ``--repeats`` runs each of the built-in trainer (``/sdapi/v1/train/embedding``)
   and ours (``POST /embtrain/v1/runs``): the same 8 photos at 64 px, steps, 1 vector, lr 0.005, no previews, no
   saves;
3. the bound, measured by the probe in the same process on a request thread like the runs': the text encoders
   with one trainable vector spliced in through the host's own embedding database, plus the UNet's forward and
   backward to that vector, with every weight frozen (no weight gradients); and the UNet alone (forward and
   backward to the conditioning). It is measured with the host's attention as set and with its SDP attention (which
   our runs use in place of a chunked one), each with the UNet's weights contiguous and channels-last (ours on the
   CPU), and the fastest counts.

Step times come from one clock for both trainers: the probe (a small tooling extension this script writes into
the WebUI's data folder, not part of the product) stamps every outermost ``torch.autograd.backward`` call; a step
is the interval between two successive calls on the training thread (both trainers call it once per step at
gradient accumulation 1; the built-in's checkpointing calls it again inside, which is not counted). The first
``--skip`` steps of each run are left out. Medians of the per-run medians are printed with the ratios, the load
average, our run's CPU thread setup and the context switches per step.

``--idle-team`` then measures SD1 again after the probe has started a thread that ran one parallel operator and
idles, keeping its OpenMP team alive (the case where our run cannot share a team; see
``embedding_trainer/cpu_threads.py``). ``--sdxl`` adds a second WebUI with a tiny random SDXL checkpoint: ours and
the bound only (the built-in cannot train SDXL), at 64 px.

    EMBTRAIN_WEBUI_DIR=... EMBTRAIN_WEBUI_PYTHON=... python -m benchmarks.webui_speed --idle-team --sdxl --out bench-out
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from tests.webui import MISSING, PYTHON, WEBUI, Client, running_webui, wait_finished

#: The probe extension's only file; it runs inside the WebUI. Tooling for this benchmark, not the product.
PROBE_FILE = "embtrain_bench_probe.py"
PROBE = r'''"""Written by embedding-trainer's benchmarks/webui_speed.py: times training steps and the bare step bound
inside the WebUI's process. Benchmark tooling, not part of the Embedding Trainer extension."""

import resource
import statistics
import threading
import time

import torch
from fastapi import Body

from modules import script_callbacks, sd_hijack, shared
from modules.call_queue import queue_lock
from modules.textual_inversion.textual_inversion import Embedding

_marks = []  # (thread id, time, voluntary context switches) at each outermost backward call while recording
_recording = [False]
_original_backward = torch.autograd.backward
_depth = threading.local()  # reentrant checkpointing (the built-in's) calls backward inside backward


def _switches():
    return resource.getrusage(resource.RUSAGE_SELF).ru_nvcsw


def _stamped_backward(*args, **kwargs):
    depth = getattr(_depth, "value", 0)
    if _recording[0] and depth == 0:
        _marks.append((threading.get_ident(), time.perf_counter(), _switches()))
    _depth.value = depth + 1
    try:
        return _original_backward(*args, **kwargs)
    finally:
        _depth.value = depth


torch.autograd.backward = _stamped_backward


def _marks_start():
    _marks.clear()
    _recording[0] = True
    return {"ok": True}


def _marks_stop():
    _recording[0] = False
    by_thread = {}
    for ident, stamp, switches in _marks:
        by_thread.setdefault(ident, []).append((stamp, switches))
    if not by_thread:
        return {"steps_s": [], "switches": []}
    stamps = max(by_thread.values(), key=len)  # the training thread
    return {
        "steps_s": [b[0] - a[0] for a, b in zip(stamps, stamps[1:])],
        "switches": [b[1] - a[1] for a, b in zip(stamps, stamps[1:])],
        "thread": max(by_thread, key=lambda k: len(by_thread[k])),
    }


def _text_embedders(model):
    if getattr(model, "is_sdxl", False):
        return [e for e in model.conditioner.embedders if hasattr(e, "encode_embedding_init_text")]
    return [model.cond_stage_model]


def _bound(body: dict = Body(...)):
    batch, size, steps, warmup = int(body["batch"]), int(body["size"]), int(body["steps"]), 5
    with queue_lock:
        model = shared.sd_model
        sdxl = bool(getattr(model, "is_sdxl", False))
        device = next(model.model.diffusion_model.parameters()).device
        dtype = next(model.model.diffusion_model.parameters()).dtype
        params = list(model.parameters())
        flags = [p.requires_grad for p in params]
        embedders = _text_embedders(model)
        trainable = [getattr(e, "is_trainable", False) for e in embedders]
        keys = ("clip_l", "clip_g") if sdxl else ("clip_l",)
        widths = [int(e.encode_embedding_init_text(",", 1).shape[-1]) for e in embedders]
        leaves = {k: (torch.randn(1, w, device=device) * 0.01).requires_grad_(True) for k, w in zip(keys, widths)}
        embedding = Embedding(leaves if sdxl else leaves["clip_l"], "embtrainbound")
        database = sd_hijack.model_hijack.embedding_db
        database.register_embedding(embedding, model)
        prompts = ["a photo of a embtrainbound"] * batch
        generator = torch.Generator().manual_seed(0)
        latents = torch.randn(batch, 4, size // 8, size // 8, generator=generator).to(device, dtype)
        noise = torch.randn(latents.shape, generator=generator).to(device, dtype)
        timesteps = torch.randint(0, 1000, (batch,), generator=generator).to(device)

        def encode():
            if not sdxl:
                return model.cond_stage_model(prompts)
            sizes = torch.tensor([[size, size]] * batch, device=device, dtype=dtype)
            return model.conditioner({
                "txt": prompts, "original_size_as_tuple": sizes, "target_size_as_tuple": sizes,
                "crop_coords_top_left": torch.zeros_like(sizes),
                "aesthetic_score": torch.full((batch, 1), 6.0, device=device, dtype=dtype),
            })

        def loss_of(cond):
            return torch.nn.functional.mse_loss(model.apply_model(latents, timesteps, cond).float(), noise.float())

        def timed(fn):
            times, switches = [], []
            for i in range(warmup + steps):
                start, before = time.perf_counter(), _switches()
                fn()
                if i >= warmup:
                    times.append(time.perf_counter() - start)
                    switches.append(_switches() - before)
            return {"median_ms": 1000 * statistics.median(times), "switches_per_step": statistics.median(switches)}

        host_attention = sd_hijack.current_optimizer
        diffusion_model = model.model.diffusion_model
        try:
            if body.get("attention"):
                sd_hijack.apply_optimizations(body["attention"])
            if body.get("channels_last"):
                diffusion_model.to(memory_format=torch.channels_last)
                latents = latents.contiguous(memory_format=torch.channels_last)
            for p in params:
                p.requires_grad_(False)
            for e in embedders:
                e.is_trainable = True
            fixed = encode()
            if sdxl:
                fixed = {k: v.detach().requires_grad_(True) for k, v in fixed.items()}
                fixed_inputs = list(fixed.values())
            else:
                fixed = fixed.detach().requires_grad_(True)
                fixed_inputs = [fixed]
            unet = timed(lambda: torch.autograd.grad(loss_of(fixed), fixed_inputs))
            encode_unet = timed(lambda: torch.autograd.grad(loss_of(encode()), list(leaves.values())))
        finally:
            for p, flag in zip(params, flags):
                p.requires_grad_(flag)
            for e, flag in zip(embedders, trainable):
                e.is_trainable = flag
            database.word_embeddings.pop("embtrainbound", None)
            database.ids_lookup.clear()
            database.load_textual_inversion_embeddings(force_reload=True)
            used = sd_hijack.current_optimizer
            diffusion_model.to(memory_format=torch.contiguous_format)
            if body.get("attention"):
                sd_hijack.apply_optimizations(host_attention.title() if host_attention else "None")
        return {"unet": unet, "encode_unet": encode_unet, "torch_threads": torch.get_num_threads(),
                "attention": used.name if used else "None",
                "layout": "channels-last" if body.get("channels_last") else "contiguous"}


def _start_idle_team():
    """A thread that runs one parallel operator and then waits: its OpenMP team stays alive and idle, as a request
    thread's does after a txt2img."""
    ready = threading.Event()

    def idle():
        torch.randn(1 << 20).exp_()
        ready.set()
        threading.Event().wait()

    threading.Thread(target=idle, name="embtrain-bench-idle-team", daemon=True).start()
    ready.wait()
    return {"ok": True}


def _on_app_started(demo, app):
    app.add_api_route("/embtrain-bench/idle-team", _start_idle_team, methods=["POST"])
    app.add_api_route("/embtrain-bench/marks/start", _marks_start, methods=["POST"])
    app.add_api_route("/embtrain-bench/marks/stop", _marks_stop, methods=["POST"])
    app.add_api_route("/embtrain-bench/bound", _bound, methods=["POST"])


script_callbacks.on_app_started(_on_app_started)
'''

BUILTIN_TEMPLATE = "subject.txt"
SDP_TITLE = "sdp - scaled dot product"  # the WebUI's title of its SDP attention
OURS_TEMPLATE = "subject"  # our copy of the same prompts


def write_photos(folder: Path, count: int = 8) -> Path:
    """The toy world's photos of a heart (a shape the shipped model has no word for), 64 px."""
    from embedding_trainer.toyworld import learning, world

    learning.write_user_photos(world.HELD_OUT_CONCEPTS["heart"], folder, count=count, seed=0)
    return folder


def run_builtin(client: Client, name: str, photos: Path, logs: Path, steps: int, batch: int) -> dict[str, Any]:
    """Create a new 1-vector embedding and train it with the WebUI's own trainer. A new name each time: its max steps
    count from the embedding's stored step, and a file replaced in place is not reloaded."""
    client.call(
        "POST",
        "/sdapi/v1/create/embedding",
        {"name": name, "num_vectors_per_token": 1, "overwrite_old": True, "init_text": "*"},
    )
    # The built-in writes its settings file into <log>/<date>/<name>/ without creating it.
    (logs / datetime.datetime.now().strftime("%Y-%m-%d") / name).mkdir(parents=True, exist_ok=True)
    body = {
        "id_task": f"task(embtrain-bench-{name})",
        "embedding_name": name,
        "learn_rate": "0.005",
        "batch_size": batch,
        "gradient_step": 1,
        "data_root": str(photos),
        "log_directory": str(logs),
        "training_width": 64,
        "training_height": 64,
        "varsize": False,
        "steps": steps,
        "clip_grad_mode": "disabled",
        "clip_grad_value": "0.1",
        "shuffle_tags": False,
        "tag_drop_out": 0,
        "latent_sampling_method": "deterministic",
        "use_weight": False,
        "create_image_every": 0,
        "save_embedding_every": 0,
        "template_filename": BUILTIN_TEMPLATE,
        "save_image_with_stored_embedding": False,
        "preview_from_txt2img": False,
        "preview_prompt": "",
        "preview_negative_prompt": "",
        "preview_steps": 20,
        "preview_sampler_name": "Euler a",
        "preview_cfg_scale": 7.0,
        "preview_seed": -1,
        "preview_width": 64,
        "preview_height": 64,
    }
    client.call("POST", "/embtrain-bench/marks/start")
    reply = client.call("POST", "/sdapi/v1/train/embedding", body)
    marks = client.call("POST", "/embtrain-bench/marks/stop")
    if "error: None" not in reply.get("info", ""):
        raise RuntimeError(f"the built-in trainer failed: {reply}")
    return {"marks": marks}


def run_ours(
    client: Client, name: str, photos: Path, work: Path, steps: int, batch: int, resolution: int | None
) -> dict[str, Any]:
    body = {
        "name": name,
        "images": str(photos),
        "max_steps": steps,
        "batch_size": batch,
        "num_vectors": 1,
        "learning_rate": "0.005",
        "init_text": "*",
        "template": OURS_TEMPLATE,
        "latent_sampling": "deterministic",
        "output_dir": str(work / "out"),
        "run_dir": str(work / "runs" / name),
        "overwrite": True,
        "save_every": 0,
        "preview_every": 0,
    }
    if resolution:
        body["resolution"] = resolution
    client.call("POST", "/embtrain-bench/marks/start")
    job = client.call("POST", "/embtrain/v1/runs", body)
    status = wait_finished(client, job["id"], timeout=3600, poll_s=0.2)
    marks = client.call("POST", "/embtrain-bench/marks/stop")
    if status["state"] != "finished":
        raise RuntimeError(f"our run ended {status['state']}: {status['error']}")
    return {"marks": marks, "status": status}


def step_median(marks: dict[str, Any], skip: int) -> tuple[float, float]:
    """Median step time (s) and median context switches per step, after the first ``skip`` steps."""
    times, switches = marks["steps_s"][skip:], marks["switches"][skip:]
    if not times:
        raise RuntimeError(f"too few steps were timed ({len(marks['steps_s'])}); raise --steps")
    return statistics.median(times), statistics.median(switches)


def measure(
    client: Client, args: argparse.Namespace, work: Path, family: str, label: str | None = None, warm_up: bool = True
) -> dict[str, Any]:
    photos = write_photos(work / "photos")
    if args.host_attention:  # the WebUI's own setting, for what-if runs (our runs and the bound follow it)
        client.call("POST", "/sdapi/v1/options", {"cross_attention_optimization": args.host_attention})
    builtin = family == "sd1"
    results: dict[str, Any] = {"family": label or family, "batches": {}}
    tag = re.sub(r"[^a-z0-9]+", "-", label or family)  # the built-in strips other characters from names
    if builtin and warm_up:  # other request threads run torch first: a txt2img and a built-in run
        client.call(
            "POST", "/sdapi/v1/txt2img", {"prompt": "a red circle", "steps": 5, "width": 64, "height": 64, "seed": 1}
        )
        run_builtin(client, "bench-builtin-warm-up", photos, work / "logs", 10, 1)
    resolution = None if builtin else 64  # SD1 (the toy model): its own 64 px, which the run must find itself
    results["load_average_before"] = os.getloadavg()[0]  # what else ran on the machine (1 min)
    loads = [results["load_average_before"]]
    for batch in args.batches:
        ours, theirs, setups, our_rates = [], [], set(), []
        for repeat in range(args.repeats):
            if builtin:
                name = f"bench-builtin-{tag}-{batch}-{repeat}"
                done = run_builtin(client, name, photos, work / "logs", args.steps, batch)
                theirs.append(step_median(done["marks"], args.skip))
            name = f"bench-ours-{tag}-{batch}-{repeat}"
            mine = run_ours(client, name, photos, work, args.steps, batch, resolution)
            status = mine["status"]
            if status["resolution"] != 64:
                raise RuntimeError(f"our run trained at {status['resolution']} px, not the checkpoint's 64 px")
            ours.append(step_median(mine["marks"], args.skip))
            setups.add(status["cpu_threads"])
            our_rates.append(status["it_per_s"])
            loads.append(os.getloadavg()[0])
            print(
                f"  {family} batch {batch} run {repeat + 1}: ours {1 / ours[-1][0]:.1f} steps/s"
                + (f", built-in {1 / theirs[-1][0]:.1f} steps/s" if builtin else ""),
                flush=True,
            )
        # The bound with the host's attention as set and with its SDP one (what our runs use in place of a chunked
        # pick), each with the UNet's weights contiguous and channels-last (ours on the CPU): the fastest counts.
        bounds = [
            client.call(
                "POST",
                "/embtrain-bench/bound",
                {
                    "batch": batch,
                    "size": 64,
                    "steps": args.bound_steps,
                    "attention": attention,
                    "channels_last": channels_last,
                },
            )
            for attention in (None, SDP_TITLE)
            for channels_last in (False, True)
        ]
        bound = min(bounds, key=lambda b: b["encode_unet"]["median_ms"])
        loads.append(os.getloadavg()[0])
        entry = {
            "ours_step_ms": 1000 * statistics.median(t for t, _ in ours),
            "ours_switches_per_step": statistics.median(s for _, s in ours),
            "ours_run_it_per_s": statistics.median(our_rates),
            "ours_cpu_threads": sorted(setups),
            "bound": bound,
        }
        if builtin:
            entry["builtin_step_ms"] = 1000 * statistics.median(t for t, _ in theirs)
            entry["builtin_switches_per_step"] = statistics.median(s for _, s in theirs)
            entry["speedup_vs_builtin"] = entry["builtin_step_ms"] / entry["ours_step_ms"]
        entry["ours_vs_encode_unet_bound"] = entry["ours_step_ms"] / bound["encode_unet"]["median_ms"]
        results["batches"][batch] = entry
    results["load_average_max"] = max(loads)
    return results


def report(results: list[dict[str, Any]]) -> str:
    lines = [
        "| model | batch | ours steps/s | built-in steps/s | ours / built-in | our step ms | bound ms (encode + UNet) "
        "| ours / bound | UNet-only bound ms | bound's attention, layout | our CPU threads | context switches per step "
        "(ours / built-in) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for result in results:
        for batch, e in result["batches"].items():
            builtin = "builtin_step_ms" in e
            lines.append(
                f"| {result['family']} | {batch} | {1000 / e['ours_step_ms']:.1f} | "
                + (f"{1000 / e['builtin_step_ms']:.1f} | {e['speedup_vs_builtin']:.2f}x | " if builtin else "- | - | ")
                + f"{e['ours_step_ms']:.1f} | {e['bound']['encode_unet']['median_ms']:.1f} | "
                f"{e['ours_vs_encode_unet_bound']:.2f} | {e['bound']['unet']['median_ms']:.1f} | "
                f"{e['bound']['attention']}, {e['bound']['layout']} | "
                f"{'; '.join(e['ours_cpu_threads'])} | {e['ours_switches_per_step']:.0f}"
                + (f" / {e['builtin_switches_per_step']:.0f} |" if builtin else " |")
            )
    loads = ", ".join(
        f"{r['family']} {r['load_average_before']:.2f} before, {r['load_average_max']:.2f} at most" for r in results
    )
    lines.append(f"\nLoad average (1 min; the runs themselves keep 2 cores busy): {loads}.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", help="attach to a running WebUI (with the probe installed) instead of starting one")
    parser.add_argument(
        "--write-probe",
        type=Path,
        metavar="EXTENSIONS_DIR",
        help="write the probe extension into a WebUI's extensions folder and exit",
    )
    parser.add_argument("--steps", type=int, default=60, help="steps per run (default 60)")
    parser.add_argument("--skip", type=int, default=10, help="first steps of each run not timed (default 10)")
    parser.add_argument("--repeats", type=int, default=3, help="runs per trainer and batch (default 3)")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--bound-steps", type=int, default=40, help="timed iterations of the bound (default 40)")
    parser.add_argument("--host-attention", help="set the WebUI's cross_attention_optimization first (a title)")
    parser.add_argument(
        "--idle-team", action="store_true", help="then measure SD1 again beside a thread that keeps an idle OpenMP team"
    )
    parser.add_argument("--sdxl", action="store_true", help="also ours and the bound on a tiny SDXL checkpoint")
    parser.add_argument("--out", type=Path, default=None, help="folder for results.json (default: none)")
    args = parser.parse_args(argv)
    if args.write_probe:
        folder = args.write_probe / "embtrain-bench-probe" / "scripts"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / PROBE_FILE).write_text(PROBE, encoding="utf-8")
        print(folder / PROBE_FILE)
        return 0
    results = []
    with tempfile.TemporaryDirectory(prefix="embtrain-webui-speed-") as scratch:
        work = Path(scratch)
        if args.url:
            results.append(measure(Client(args.url), args, work / "attached", "sd1"))
        else:
            from embedding_trainer.toyworld.learning import SHIPPED_MODEL

            if not (WEBUI and PYTHON):
                parser.error(MISSING)
            families = [("sd1", SHIPPED_MODEL), *([("sdxl", None)] if args.sdxl else [])]
            for family, model in families:
                data, models = work / family / "data", work / family / "models"
                load_before = os.getloadavg()[0]  # before the WebUI's own start-up adds to it
                started = time.monotonic()
                with running_webui(
                    data, models, with_ui=False, family=family, model=model, extra_scripts={PROBE_FILE: PROBE}
                ) as base:
                    print(f"{family}: WebUI up in {time.monotonic() - started:.0f} s at {base}", flush=True)
                    (data / "embeddings").mkdir(exist_ok=True)  # where the built-in creates its embedding
                    client = Client(base)
                    results.append(measure(client, args, work / family, family))
                    results[-1]["load_average_before"] = load_before
                    if args.idle_team and family == "sd1":
                        client.call("POST", "/embtrain-bench/idle-team")
                        results.append(measure(client, args, work / family, family, "sd1 + idle team", False))
    text = report(results)
    print(text)
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "webui_speed.json").write_text(json.dumps(results, indent=2), encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
