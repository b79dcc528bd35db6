"""Supervised fine-tuning of the tool model: a Hugging Face causal LM, loss on the completion only.

Each example is rendered with the model's own chat template, exactly as the transformers and
vLLM backends render a request (``add_generation_prompt=True``, no extra special tokens), and the
completion is what the template appends for the assistant turn (the reply plus its end-of-turn
marker), so the model learns to stop. Prompt tokens get label -100: the loss is
-log P(completion | prompt), MAGA's -log P_theta(D' | D, G).

A small Lightning module rather than TRL's ``SFTTrainer``: the package trains with Lightning
already (devices, precision, DDP/FSDP strategies, gradient accumulation are Trainer flags), the
completion mask is a few lines that a test checks token by token, and it adds no dependency
(TRL would bring ``accelerate`` and ``datasets`` and an API that has renamed its SFT arguments
several times). MAGA's settings are the defaults: prompt and completion up to 4096 tokens each,
3 epochs, cosine schedule.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from megadoc_pl.synth.toolmodel.dataset import STAGES, load_examples

IGNORE_INDEX = -100  # label of prompt and padding tokens (torch cross-entropy's ignore_index)


@dataclass
class SFTConfig:
    """How the tool model is fine-tuned (recorded in OUT/toolmodel.json)."""

    model: str  # base model: a Hugging Face causal LM directory or hub name with a chat template
    data: str  # sft.jsonl (or its directory) from `tools/toolmodel.py dataset`
    out: str  # the tool model is saved here (save_pretrained: weights, tokenizer, toolmodel.json)
    stages: list[str] = field(default_factory=lambda: list(STAGES))  # train on pairs and/or reformulate
    max_prompt_tokens: int = 4096  # longer prompts: example skipped and counted (MAGA: 4096)
    max_completion_tokens: int = 4096  # longer completions: example skipped and counted (MAGA: 4096)
    epochs: int = 3  # passes over the examples (MAGA: 3)
    max_steps: int = -1  # optimizer steps; -1: epochs decide
    lr: float = 1e-5  # peak learning rate (MAGA does not give it)
    warmup_ratio: float = 0.03  # share of the steps with linear warm-up, then cosine to 0
    weight_decay: float = 0.0
    batch_size: int = 1  # examples per micro-batch (padded to the longest)
    accumulate_grad_batches: int = 1
    precision: str | None = None  # Lightning precision; None: bf16-mixed on GPU, 32-true on CPU
    accelerator: str = "auto"
    devices: Any = "auto"
    strategy: str = "auto"  # Lightning strategy: ddp for several GPUs
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        checks = [
            (all(s in STAGES for s in self.stages) and self.stages, f"--stages: choose from {', '.join(STAGES)}"),
            (self.max_prompt_tokens >= 1 and self.max_completion_tokens >= 1, "token limits must be >= 1"),
            (self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.lr > 0, f"--lr must be > 0, got {self.lr}"),
            (0 <= self.warmup_ratio < 1, f"--warmup-ratio must be in [0, 1), got {self.warmup_ratio}"),
            (self.batch_size >= 1 and self.accumulate_grad_batches >= 1, "batch sizes must be >= 1"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(message)


def completion_text(tokenizer, messages: list[dict], completion: str) -> str:
    """What the chat template appends after the generation prompt for the assistant's reply.

    Falls back to ``completion + eos`` for templates whose full conversation does not extend
    the generation prompt (some templates rewrite earlier turns once a reply is present).
    """
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": completion}],
                                         tokenize=False)
    if full.startswith(prompt) and completion in full[len(prompt):]:
        return full[len(prompt):]
    return completion + (tokenizer.eos_token or "")


def encode_example(tokenizer, messages: list[dict], completion: str) -> tuple[list[int], list[int], int]:
    """(input_ids, labels, prompt_len): prompt and completion tokenized apart, so the boundary is
    exactly where generation starts; labels are -100 over the prompt."""
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion_text(tokenizer, messages, completion), add_special_tokens=False)["input_ids"]
    return prompt_ids + completion_ids, [IGNORE_INDEX] * len(prompt_ids) + completion_ids, len(prompt_ids)


def encode_examples(tokenizer, examples: list[dict], cfg: SFTConfig) -> tuple[list[dict], dict]:
    """Encoded examples of the chosen stages, and counts (kept and skipped as too long, per stage)."""
    encoded, counts = [], {}
    for e in examples:
        if e["stage"] not in cfg.stages:
            continue
        ids, labels, prompt_len = encode_example(tokenizer, e["messages"], e["completion"])
        too_long = prompt_len > cfg.max_prompt_tokens or len(ids) - prompt_len > cfg.max_completion_tokens
        key = f"{e['stage']}_{'skipped_too_long' if too_long else 'kept'}"
        counts[key] = counts.get(key, 0) + 1
        if not too_long:
            encoded.append({"input_ids": ids, "labels": labels})
    return encoded, counts


def collate(batch: list[dict], pad_id: int) -> dict:
    """Right-padded (B, T) tensors; padding is masked out of attention and loss."""
    import torch

    T = max(len(b["input_ids"]) for b in batch)
    ids_BT = torch.full((len(batch), T), pad_id, dtype=torch.long)
    labels_BT = torch.full((len(batch), T), IGNORE_INDEX, dtype=torch.long)
    mask_BT = torch.zeros((len(batch), T), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        ids_BT[i, :n] = torch.tensor(b["input_ids"])
        labels_BT[i, :n] = torch.tensor(b["labels"])
        mask_BT[i, :n] = 1
    return {"input_ids": ids_BT, "labels": labels_BT, "attention_mask": mask_BT}


def cosine_with_warmup(step: int, warmup: int, total: int) -> float:
    """LR multiplier: linear warm-up over ``warmup`` steps, then cosine from 1 to 0 at ``total``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return 0.5 * (1.0 + math.cos(math.pi * progress))


def _module(model, cfg: SFTConfig, total_steps: int):
    import lightning as L
    import torch

    class CausalLMSFT(L.LightningModule):
        """The causal LM; its loss is the HF shifted cross-entropy over labels != -100."""

        def __init__(self) -> None:
            super().__init__()
            self.model = model.train()  # from_pretrained returns it in eval mode (dropout off)
            self.losses: list[float] = []

        def training_step(self, batch, batch_idx):
            loss = self.model(**batch).loss
            self.log("train/loss", loss, prog_bar=True)
            self.losses.append(float(loss.detach()))
            return loss

        def configure_optimizers(self):
            opt = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
            warmup = int(cfg.warmup_ratio * total_steps)
            sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: cosine_with_warmup(s, warmup, total_steps))
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    return CausalLMSFT()


def train_tool_model(cfg: SFTConfig) -> dict:
    """Fine-tune ``cfg.model`` on the SFT examples and save the tool model to ``cfg.out``; returns
    the record written to OUT/toolmodel.json."""
    import lightning as L
    import torch
    import transformers

    from megadoc_pl.synth.backends.base import check_model_path
    from megadoc_pl.train.rundir import git_revision, library_versions
    from megadoc_pl.utils import atomic_write_json

    check_model_path(cfg.model)
    t0 = time.perf_counter()
    L.seed_everything(cfg.seed, verbose=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(cfg.model)
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError(f"the tokenizer of {cfg.model} has no chat template (fix: start from an instruct "
                         "model, or add a chat template to its tokenizer_config.json)")
    encoded, counts = encode_examples(tokenizer, load_examples(cfg.data), cfg)
    if not encoded:
        raise ValueError(f"no training example of stages {','.join(cfg.stages)} fits (counts: {counts}) "
                         "(fix: raise --max-prompt-tokens / --max-completion-tokens or check --stages)")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    loader = torch.utils.data.DataLoader(
        encoded, batch_size=cfg.batch_size, shuffle=True, collate_fn=lambda b: collate(b, pad_id),
        generator=torch.Generator().manual_seed(cfg.seed))
    steps_per_epoch = math.ceil(len(loader) / cfg.accumulate_grad_batches)
    total_steps = cfg.max_steps if cfg.max_steps > 0 else cfg.epochs * steps_per_epoch
    model = transformers.AutoModelForCausalLM.from_pretrained(cfg.model, dtype=torch.float32)
    module = _module(model, cfg, total_steps)
    precision = cfg.precision or ("bf16-mixed" if torch.cuda.is_available() else "32-true")
    trainer = L.Trainer(
        max_epochs=cfg.epochs, max_steps=cfg.max_steps, accumulate_grad_batches=cfg.accumulate_grad_batches,
        gradient_clip_val=1.0, precision=precision, accelerator=cfg.accelerator, devices=cfg.devices,
        strategy=cfg.strategy, logger=False, enable_checkpointing=False, enable_model_summary=False,
        enable_progress_bar=cfg.progress, num_sanity_val_steps=0,
    )
    trainer.fit(module, train_dataloaders=loader)
    record = {
        "config": asdict(cfg), "examples": counts, "optimizer_steps": trainer.global_step,
        "micro_batches": len(module.losses), "first_loss": module.losses[0], "last_loss": module.losses[-1],
        "wall_s": round(time.perf_counter() - t0, 3), "git": git_revision(), "versions": library_versions(),
    }
    if trainer.is_global_zero:
        out = Path(cfg.out)
        module.model.save_pretrained(out)
        tokenizer.save_pretrained(out)
        atomic_write_json(out / "toolmodel.json", record)
    return record

