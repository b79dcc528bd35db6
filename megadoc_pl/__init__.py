"""megadoc_pl: data-constrained LLM pre-training with synthetic data, in PyTorch Lightning.

Layout (each folder is one part of the pipeline):
  data/      readers, token store, corpus views, mixture, windows, LightningDataModule
  synth/     synthetic generation: backends, tasks, prompts, sharded resumable runner
  model/     the Llama model, attention backends, chunked loss, Hugging Face interop
  train/     LightningModule, run directory, callbacks, CLI
  eval/      named validation sets, loss by position, multiple choice, ensembles
  analysis/  scaling fits, data efficiency, tuner, loss patterns, plots
  demo/      the built-in procedural world, template generator, demo tokenizer
"""

__version__ = "0.1.0"
