"""What a run prints: a step progress bar, one model line, the final metrics table; third-party noise silenced."""

from __future__ import annotations

import logging
import warnings

import pytest

from megadoc_pl.train import console


def test_metrics_table_shows_the_headline_and_leaves_the_rest_to_the_file():
    metrics = {"val/iid/loss": 3.1549, "val/long/loss": 2.9331, "downstream/arc/acc": 0.25, "steps": 300,
               "tokens_seen": 614400, "train/loss": 1.777, "train/lr": 2.8e-08, "train/tokens_per_s": 10061.4, "status": "finished",
               "version/torch": "2.13.0", "total_time_s": 63.93}
    lines = console.metrics_table(metrics).splitlines()
    assert lines[0].split() == ["metric", "value"]
    rows = dict(line.split() for line in lines[2:])
    assert rows == {"downstream/arc/acc": "0.25", "val/iid/loss": "3.155", "val/long/loss": "2.933",
                    "steps": "300", "tokens_seen": "614,400", "train/loss": "1.777", "train/tokens_per_s": "10,061",
                    "total_time_s": "63.93"}
    assert console.metrics_table({"status": "failed"}) == ""


def test_only_the_named_noise_is_silenced(caplog):
    console.quiet_third_party()
    log = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    with caplog.at_level(logging.INFO, logger=log.name):
        log.info("💡 Tip: try installing [litlogger](https://pypi.org/project/litlogger/)")
        log.info("GPU available: False, used: False")
    assert [r.getMessage() for r in caplog.records] == ["GPU available: False, used: False"]
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("default")
        console.quiet_third_party()  # re-installs its filters after simplefilter reset them
        warnings.warn("`isinstance(treespec, LeafSpec)` is deprecated, use ...", FutureWarning)
        warnings.warn("a real warning", UserWarning)
    assert [str(w.message) for w in seen] == ["a real warning"]


def test_the_progress_bar_counts_steps_not_epochs():
    pytest.importorskip("rich")  # without rich, Lightning's tqdm bar says "Epoch 0", which is true
    bar = console.step_progress_bar()
    assert bar._get_train_description(0).strip() == "train"
    assert "Epoch" not in bar._get_train_description(3)


def test_model_line():
    assert console.model_line(950_912, 426_624, 4.52352e6) == (
        "model: 951K parameters (427K outside the embeddings), 4.52M training FLOPs per token at full attention")
