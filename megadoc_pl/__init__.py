"""megadoc_pl: data-constrained LLM pre-training with synthetic data, in PyTorch Lightning.

Layout (each folder is one part of the pipeline):
  data/      readers, token store, corpus views, mixture, windows, LightningDataModule
  synth/     synthetic generation: backends, tasks, prompts, sharded resumable runner
  model/     the Llama model, attention backends, chunked loss, Hugging Face interop
  train/     LightningModule, run directory, callbacks, CLI
  eval/      named validation sets, loss by position, multiple choice, ensembles
  analysis/  scaling fits, data efficiency, tuner, loss patterns, plots
  demo/      the built-in procedural world, template generator, demo tokenizer

From Python (api.py, docs/python-api.md): ``megadoc_pl.datamodule(recipe, overrides)``,
``megadoc_pl.lightning_module(dm)``, ``megadoc_pl.trainer_kwargs(dm)`` and
``megadoc_pl.recipe(name, overrides)``. They are imported on first use, so ``import megadoc_pl``
stays light (no torch, no Lightning).
"""

__version__ = "0.1.0"

_API = ("recipe", "datamodule", "lightning_module", "trainer_kwargs")
__all__ = ["__version__", *_API]


def __getattr__(name: str) -> object:
    if name in _API:
        from megadoc_pl import api

        return getattr(api, name)
    raise AttributeError(f"module 'megadoc_pl' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_API))
