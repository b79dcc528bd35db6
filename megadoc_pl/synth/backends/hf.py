"""Hugging Face transformers backend: batched ``generate`` with left padding and the chat template.

Runs on CPU or GPU. Requests are grouped by sampling settings (n, max_new_tokens, temperature,
top_p), sorted by prompt length inside a group so a batch pads little, and generated
``batch_size`` prompts at a time with ``num_return_sequences=n``. transformers has no per-row
seed, so a batch is seeded with its first request's seed: outputs are reproducible for the same
requests and batch size. A batch that raises (out of memory, ...) is retried one request at a
time; a request that still fails gets an error Response instead of aborting the run.

Raw completion (``raw=True``, task ``self_distill``): a request's ``prompt_ids`` are continued as
they are, no chat template, so a base model (our own HF export, which has none) can be the
generator; such prompts are left-padded by hand and never re-tokenized.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

from megadoc_pl.errors import BadInput
from megadoc_pl.synth.backends.base import Request, Response, check_model_path, error_line, register_backend


class TransformersBackend:
    name = "transformers"
    raw_completion = True  # continues Request.prompt_ids (see raw)

    def __init__(
        self,
        model: str,
        device: str | None = None,
        dtype: str = "auto",
        batch_size: int = 8,
        chat_template: str | None = None,
        quantize: str | None = None,  # "int8": torchao int8 Linear layers, for CPU serving (synth/toolmodel)
        trust_remote_code: bool = False,
        raw: bool = False,  # base-LM completion: no chat template is needed (requests carry prompt_ids)
    ) -> None:
        import torch  # core dependencies, imported here to keep `import megadoc_pl.synth` light
        import transformers

        self._torch = torch
        check_model_path(model)
        self.model_name = str(model)
        self.batch_size = int(batch_size)
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(
            model, trust_remote_code=trust_remote_code
        )
        if chat_template is not None:
            # A file path or the Jinja text itself.
            p = Path(chat_template)
            self.tokenizer.chat_template = p.read_text() if p.is_file() else chat_template
        if not raw and not getattr(self.tokenizer, "chat_template", None):
            raise BadInput(
                f"the tokenizer of {model} has no chat template "
                "(fix: use an instruct model, or pass --chat-template FILE)"
            )
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        torch_dtype = dtype if dtype == "auto" else getattr(torch, dtype)
        self.model = transformers.AutoModelForCausalLM.from_pretrained(
            model, dtype=torch_dtype, trust_remote_code=trust_remote_code
        ).to(self.device)
        self.model.eval()
        if quantize is not None:  # e.g. a distilled MAGA tool model served on CPU
            from megadoc_pl.synth.toolmodel.quantize import quantize_linears

            quantize_linears(self.model, quantize)
            self.model_name = f"{self.model_name}+{quantize}"  # rows record that the model was quantized
        self.uses_gpu = self.device.type == "cuda"
        eos = self.model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, (list, tuple)) else [eos])

    # ------------------------------------------------------------------ prompts

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )

    def generate(self, requests: list[Request]) -> list[Response]:
        prompts = {r.id: self.render(r.messages) for r in requests if r.prompt_ids is None}
        lengths = {
            r.id: len(r.prompt_ids) if r.prompt_ids is not None
            else len(self.tokenizer(prompts[r.id], add_special_tokens=False)["input_ids"])
            for r in requests
        }
        groups: dict[tuple, list[Request]] = defaultdict(list)
        for r in requests:
            groups[(r.prompt_ids is not None, r.n, r.max_new_tokens, r.temperature, r.top_p)].append(r)
        done: dict[str, Response] = {}
        for group in groups.values():
            group.sort(key=lambda r: lengths[r.id])
            for start in range(0, len(group), self.batch_size):
                batch = group[start : start + self.batch_size]
                try:
                    results = self._generate_batch(batch, [prompts.get(r.id) for r in batch])
                except Exception as e:  # noqa: BLE001 - retried one by one below
                    if len(batch) == 1:
                        results = [Response(batch[0].id, [], lengths[batch[0].id], [], error_line(e))]
                    else:
                        results = []
                        for r in batch:
                            try:
                                results += self._generate_batch([r], [prompts.get(r.id)])
                            except Exception as e1:  # noqa: BLE001
                                results.append(Response(r.id, [], lengths[r.id], [], error_line(e1)))
                for res in results:
                    done[res.request_id] = res
        return [done[r.id] for r in requests]

    # ------------------------------------------------------------------ one batch

    def _encode_raw(self, batch: list[Request]) -> dict:
        """Left-padded input_ids / attention_mask of the batch's prompt_ids (not re-tokenized)."""
        torch = self._torch
        width = max(len(r.prompt_ids) for r in batch)
        ids = [[self.tokenizer.pad_token_id] * (width - len(r.prompt_ids)) + list(r.prompt_ids) for r in batch]
        mask = [[0] * (width - len(r.prompt_ids)) + [1] * len(r.prompt_ids) for r in batch]
        return {"input_ids": torch.tensor(ids, device=self.device),
                "attention_mask": torch.tensor(mask, device=self.device)}

    def _generate_batch(self, batch: list[Request], prompts: list[str | None]) -> list[Response]:
        torch = self._torch
        first = batch[0]
        if first.prompt_ids is not None:
            enc = self._encode_raw(batch)
        else:
            enc = self.tokenizer(
                prompts, return_tensors="pt", padding=True, add_special_tokens=False
            ).to(self.device)
        prompt_len = enc["input_ids"].shape[1]
        kwargs = dict(
            max_new_tokens=first.max_new_tokens,
            num_return_sequences=first.n,
            pad_token_id=self.tokenizer.pad_token_id,
        )
        if first.temperature > 0:
            kwargs.update(do_sample=True, temperature=first.temperature, top_p=first.top_p)
        else:
            kwargs.update(do_sample=False)
        if first.seed is not None:
            torch.manual_seed(first.seed)
        with torch.no_grad():
            out_BL = self.model.generate(**enc, **kwargs)
        new_BL = out_BL[:, prompt_len:].tolist()
        prompt_tokens = enc["attention_mask"].sum(dim=1).tolist()
        responses = []
        for b, req in enumerate(batch):
            texts, counts, reasons = [], [], []
            for seq in new_BL[b * req.n : (b + 1) * req.n]:
                stop = next((i + 1 for i, t in enumerate(seq) if t in self.eos_ids), None)
                counts.append(stop or len(seq))
                reasons.append("stop" if stop else "length")
                texts.append(self.tokenizer.decode(seq[: counts[-1]], skip_special_tokens=True))
            responses.append(Response(req.id, texts, int(prompt_tokens[b]), counts, finish_reasons=reasons))
        return responses


register_backend("transformers", TransformersBackend)
