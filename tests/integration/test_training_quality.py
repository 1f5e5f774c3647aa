"""The quality methods do what they say: the held-out score, best vectors and early stopping, the initialisations
(best-word, encoder-output), norm control and the scale-aware learning rate. (How much each helps is measured by
``benchmarks/learning.py``, not here.)"""

from __future__ import annotations

import csv
import math
import time

import pytest
import torch

from embedding_trainer.config import TrainConfig
from embedding_trainer.embedding_reading import load_embedding
from embedding_trainer.errors import ConfigError
from embedding_trainer.hosts.diffusers_host import DiffusersHost
from embedding_trainer.initialization import (
    BUILT_IN_INIT_WORDS,
    SD1_TABLE_SCALE,
    init_candidates,
    table_scale,
    vectors_from_text,
)
from embedding_trainer.tools.tiny_models import build_tiny_components
from embedding_trainer.trainer import Callbacks, PreparedRun, Trainer, prepare_run
from embedding_trainer.trainer.objective import Objective
from tests.helpers import run_fields

pytestmark = pytest.mark.compat


@pytest.fixture(scope="module")
def host() -> DiffusersHost:
    return DiffusersHost.from_components(build_tiny_components("sd1", seed=0))


def config(tmp_path, **changes) -> TrainConfig:
    return TrainConfig(**run_fields(tmp_path, **changes))


def prepared(tmp_path, **changes) -> PreparedRun:
    return prepare_run(config(tmp_path, **changes))


def scripted_scores(monkeypatch, scores: dict[int, float]) -> None:
    """Make the held-out score at step s be ``scores[s]`` (the evaluation order gives the step)."""
    steps = iter(sorted(scores))
    monkeypatch.setattr(Objective, "held_out_loss", lambda self, leaves, batches, seed: scores[next(steps)])


def snapshots() -> tuple[dict[int, dict[str, torch.Tensor]], Callbacks]:
    kept: dict[int, dict[str, torch.Tensor]] = {}

    def on_step(step, vectors):
        kept[step] = {k: v.detach().cpu().clone() for k, v in vectors.items()}

    return kept, Callbacks(on_step=on_step)


def test_the_held_out_score_is_the_same_for_the_same_vectors(tmp_path, host):
    trainer = Trainer(prepared(tmp_path), host)
    # (Not a uniform shift: every layer norm of the encoder takes the mean out, so a shift changes nothing.)
    vectors = {
        k: v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(0))
        for k, v in trainer.vectors.items()
    }
    first, second = trainer.held_out_loss(vectors), trainer.held_out_loss(vectors)
    assert first == second and math.isfinite(first)
    assert trainer.held_out_loss(trainer.vectors) != first  # other vectors, another score


def test_the_file_holds_the_best_scored_vectors_and_says_which(tmp_path, host, monkeypatch):
    scripted_scores(monkeypatch, {0: 1.0, 2: 0.5, 4: 0.3, 6: 0.4})
    kept, callbacks = snapshots()
    run = config(tmp_path, max_steps=6, eval_every=2, final_vectors="best")
    result = Trainer(prepare_run(run), host, callbacks).run()
    assert (result.steps, result.vectors_step, result.held_out_loss, result.early_stopped) == (6, 4, 0.3, False)
    data = load_embedding(result.embedding_path)
    assert torch.equal(data.vectors["vec"], kept[4]["clip_l"]) and not torch.equal(kept[4]["clip_l"], kept[6]["clip_l"])
    assert (data.step, data.metadata["vectors_step"], data.metadata["run_steps"]) == (4, "4", "6")
    assert float(data.metadata["held_out_loss"]) == 0.3


def test_final_vectors_last_the_default_keeps_the_last_step(tmp_path, host, monkeypatch):
    scripted_scores(monkeypatch, {0: 1.0, 2: 0.5, 4: 0.3, 6: 0.4})
    kept, callbacks = snapshots()
    result = Trainer(prepared(tmp_path, max_steps=6, eval_every=2), host, callbacks).run()  # last: the default
    assert result.vectors_step == 6
    assert torch.equal(load_embedding(result.embedding_path).vectors["vec"], kept[6]["clip_l"])


def test_early_stopping_stops_when_the_score_stalls_and_keeps_the_best(tmp_path, host, monkeypatch):
    # Improves until step 4; 6 and 8 are no better (8 by less than the minimum improvement): stop at 8.
    scripted_scores(monkeypatch, {0: 1.0, 2: 0.6, 4: 0.5, 6: 0.55, 8: 0.4999, 10: 0.1})
    kept, callbacks = snapshots()
    run = config(tmp_path, max_steps=20, eval_every=2, early_stop_patience=2, final_vectors="best")
    result = Trainer(prepare_run(run), host, callbacks).run()
    assert (result.steps, result.early_stopped, result.stopped) == (8, True, False)
    assert max(kept) == 8  # no step after the stop
    assert result.vectors_step == 8  # the lowest score, though not by the margin that counts as progress
    assert torch.equal(load_embedding(result.embedding_path).vectors["vec"], kept[8]["clip_l"])


def test_a_resumed_run_replaces_the_best_vectors_file_its_run_wrote(tmp_path, host, monkeypatch):
    scripted_scores(monkeypatch, {0: 1.0, 2: 0.2, 4: 0.3})
    best = {"eval_every": 2, "final_vectors": "best"}
    Trainer(prepared(tmp_path, max_steps=4, save_every=2, **best), host).run()  # the file holds step 2
    monkeypatch.setattr(Objective, "held_out_loss", lambda self, leaves, batches, seed: 0.1)
    result = Trainer(prepared(tmp_path, max_steps=6, resume=str(tmp_path / "run"), **best), host).run()
    assert result.steps == 6 and load_embedding(result.embedding_path).metadata["run_steps"] == "6"


def test_norm_band_keeps_every_vector_within_its_band(tmp_path, host):
    lengths: list[torch.Tensor] = []
    callbacks = Callbacks(on_step=lambda step, vectors: lengths.append(vectors["clip_l"].norm(dim=-1)))
    fields = {"max_steps": 5, "learning_rate": "0.5", "lr_scale": "absolute", "eval_every": 0}
    trainer = Trainer(prepared(tmp_path / "band", norm_band=1.25, **fields), host, callbacks)
    trainer.run()
    median = trainer.word_norms["clip_l"]
    low, high = median / 1.25, median * 1.25
    assert all(((n >= low * (1 - 1e-5)) & (n <= high * (1 + 1e-5))).all() for n in lengths)
    # Without the band the same rate takes the vectors out of it (so the check above can fail).
    free: list[torch.Tensor] = []
    free_callbacks = Callbacks(on_step=lambda s, v: free.append(v["clip_l"].norm(dim=-1)))
    Trainer(prepared(tmp_path / "free", **fields), host, free_callbacks).run()
    assert (free[-1] > high).any()


def test_norm_band_one_trains_only_the_direction(tmp_path, host):
    lengths: list[torch.Tensor] = []
    trainer = Trainer(
        prepared(tmp_path, max_steps=3, norm_band=1.0, eval_every=0),
        host,
        Callbacks(on_step=lambda step, vectors: lengths.append(vectors["clip_l"].norm(dim=-1))),
    )
    trainer.run()
    assert all(torch.allclose(n, torch.full_like(n, trainer.word_norms["clip_l"]), rtol=1e-5) for n in lengths)


def test_a_norm_band_below_one_is_refused():
    with pytest.raises(ConfigError, match="norm_band"):
        TrainConfig(norm_band=0.5)


@pytest.mark.parametrize("lr_scale, ratio", [("table", 1.0), ("absolute", 10.0)])
def test_the_table_scaled_rate_takes_the_same_relative_step_on_tables_of_any_scale(tmp_path, lr_scale, ratio):
    """Adam's first step moves every coordinate by the rate; in table units the rate follows the table's scale."""
    relative = []
    for index, factor in enumerate((1.0, 10.0)):
        scaled = DiffusersHost.from_components(build_tiny_components("sd1", seed=0))
        with torch.no_grad():
            scaled.text_encoders[0].get_input_embeddings().weight.mul_(factor)
        kept, callbacks = snapshots()
        run = config(tmp_path / str(index), max_steps=1, eval_every=0, lr_scale=lr_scale, learning_rate="0.001")
        trainer = Trainer(prepare_run(run), scaled, callbacks)
        start = trainer.vectors["clip_l"].clone()
        trainer.run()
        step = (kept[1]["clip_l"] - start).abs().max().item()
        relative.append(step / table_scale(scaled, "clip_l"))
        if lr_scale == "table":
            assert trainer.lr_factors["clip_l"] == pytest.approx(table_scale(scaled, "clip_l") / SD1_TABLE_SCALE)
    assert relative[0] / relative[1] == pytest.approx(ratio, rel=1e-3)


def test_best_word_starts_from_the_candidate_with_the_lowest_loss(tmp_path, host, monkeypatch):
    target = vectors_from_text(host, "dog", TrainConfig().num_vectors)["clip_l"]

    def loss_by_distance(self, leaves, batches, seed):  # lowest for the vectors of "dog"
        return float((leaves["clip_l"].cpu() - target).norm()) + 1.0

    monkeypatch.setattr(Objective, "held_out_loss", loss_by_distance)
    chosen: dict[str, object] = {}
    callbacks = Callbacks(on_init_choice=lambda word, losses: chosen.update(word=word, losses=losses))
    trainer = Trainer(prepared(tmp_path, max_steps=1, init_mode="best-word", eval_every=0), host, callbacks)
    result = trainer.run()
    assert result.init_choice == chosen["word"] == "dog"
    assert chosen["losses"]["dog"] == min(chosen["losses"].values()) == 1.0
    assert torch.equal(trainer.initial_vectors["clip_l"], target)
    assert load_embedding(result.embedding_path).metadata["init_choice"] == "dog"


def test_best_word_candidates_are_the_init_text_the_captions_words_and_the_built_in_list():
    captions = ["square 1, flat background", "square 2, flat background", "a photo of my-cat"]
    candidates = init_candidates("fluffy toy", captions, "my-cat")
    assert candidates[:5] == ["fluffy toy", "fluffy", "toy", "square", "flat"]
    assert "my-cat" not in candidates and "background" not in candidates[:5]  # no trigger; stop words last
    assert set(BUILT_IN_INIT_WORDS) <= set(candidates) and len(candidates) == len(set(candidates))


def test_encoder_output_init_is_what_the_encoder_gives_the_unet_at_those_tokens(tmp_path, host):
    trainer = Trainer(prepared(tmp_path, init_mode="encoder-output", init_text="red square", num_vectors=2), host)
    output = host.encoder_output("clip_l", "red square")
    assert output.shape[0] == 2 and torch.equal(trainer.vectors["clip_l"], output)
    # The same states the training prompts' encoding has at those positions (the start token is position 0).
    conditioning = host.encode_prompts(["red square"], "my-cat", dict(trainer.vectors), [])
    assert torch.allclose(conditioning.hidden_states[0, 1:3].float(), output, atol=1e-6)
    assert not torch.allclose(output, host.token_embeddings("clip_l", "red square"))


def test_the_run_header_says_what_the_methods_will_do(tmp_path, host):
    header = Trainer(
        prepared(tmp_path, init_mode="best-word", norm_band=1.5, early_stop_patience=3, eval_every=10), host
    ).describe()
    assert "and other words, ranked by loss" in header and "length within x1.5" in header
    assert "in table units (clip_l x" in header and "stops after 3 evaluations without improvement" in header


def test_runs_saved_before_table_units_resume_with_their_absolute_rate():
    old = TrainConfig.from_dict(TrainConfig.saved_fields('{"name": "my-cat", "learning_rate": "0.005"}'))
    assert (old.lr_scale, old.learning_rate) == ("absolute", "0.005")
    new = TrainConfig.from_dict(TrainConfig.saved_fields(TrainConfig(name="my-cat").to_json()))
    assert new.lr_scale == "table"


def scores_in_call_order(monkeypatch, scores: list[float]) -> None:
    """Make the n-th held-out score the trainer computes be ``scores[n]``."""
    values = iter(scores)
    monkeypatch.setattr(Objective, "held_out_loss", lambda self, leaves, batches, seed: next(values))


def test_the_first_of_several_starts_is_the_one_start_run_and_carries_on_with_its_optimiser_state(
    tmp_path, host, monkeypatch
):
    single = Trainer(prepared(tmp_path / "one", max_steps=5, eval_every=0), host).run()
    # Step-0 score, then the three starts' scores (the first lowest), then the evaluations after the starts.
    scores_in_call_order(monkeypatch, [1.0, 0.2, 0.5, 0.4, 0.3, 0.3])
    said: dict[str, float] = {}
    callbacks = Callbacks(on_status=lambda text: said.setdefault(text.split(":")[0], time.perf_counter()))
    run = config(tmp_path / "three", max_steps=5, eval_every=5, starts=3, start_steps=2)
    result = Trainer(prepare_run(run), host, callbacks).run()
    assert (result.chosen_start, result.start_scores, result.steps) == (1, [0.2, 0.5, 0.4], 5)
    one, three = load_embedding(single.embedding_path), load_embedding(result.embedding_path)
    assert torch.equal(one.vectors["vec"], three.vectors["vec"])  # moments restored: the same trajectory
    assert three.metadata["starts"] == "start 1 of 3 (held-out scores 0.2, 0.5, 0.4)"
    # The logged time of step 2 (start 1's last) includes starts 2 and 3, trained after it: speed and ETA count them.
    rows = list(csv.reader((result.run_dir / "loss.csv").open()))[1:]
    elapsed = {int(row[0]): float(row[4]) for row in rows}
    assert elapsed[2] >= said["carrying on with start 1 of 3"] - said["start 1 of 3"]


def test_the_run_carries_on_with_the_start_of_lowest_score_and_logs_only_its_steps(tmp_path, host, monkeypatch):
    single = Trainer(prepared(tmp_path / "one", max_steps=4, eval_every=0), host).run()
    scores_in_call_order(monkeypatch, [1.0, 0.5, 0.2, 0.4, 0.3])
    kept, callbacks = snapshots()
    progress: list[int] = []
    callbacks.on_progress = lambda p: progress.append(p.step)
    run = config(tmp_path / "three", max_steps=4, eval_every=2, starts=3, start_steps=2)
    result = Trainer(prepare_run(run), host, callbacks).run()
    assert (result.chosen_start, result.steps, result.vectors_step) == (2, 4, 4)
    assert not torch.equal(load_embedding(single.embedding_path).vectors["vec"], kept[4]["clip_l"])
    assert sorted(kept) == [2, 3, 4]  # the chosen start's step 2, then the run's own steps
    assert progress == [1, 2, 3, 4]
    rows = (result.run_dir / "loss.csv").read_text().splitlines()[1:]
    assert [int(row.split(",")[0]) for row in rows] == [1, 2, 3, 4]


def test_starts_with_real_scores_pick_the_lowest(tmp_path, host):
    result = Trainer(prepared(tmp_path, max_steps=3, starts=2, start_steps=2), host).run()
    assert len(result.start_scores) == 2 and all(math.isfinite(s) for s in result.start_scores)
    assert result.start_scores[result.chosen_start - 1] == min(result.start_scores)
    assert result.start_scores[0] != result.start_scores[1]  # each start its own draws


def test_a_stop_during_the_starts_keeps_the_best_finished_start(tmp_path, host, monkeypatch):
    scores_in_call_order(monkeypatch, [1.0, 0.5, 0.9])
    calls = iter(range(100))
    # Steps 1-2 of start 1, step 1 of start 2, then stop.
    callbacks = Callbacks(should_stop=lambda: next(calls) >= 3)
    run = config(tmp_path, max_steps=6, starts=3, start_steps=2)
    result = Trainer(prepare_run(run), host, callbacks).run()
    assert (result.stopped, result.steps, result.chosen_start, result.start_scores) == (True, 2, 1, [0.5])
