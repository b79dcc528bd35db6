"""MAGA tool models: distil the labeler LLM into a small generator, quantize it, check it.

MAGA (docs/papers.md, MAGA 2, 6, 7) does not generate its corpus with the big LLM: a small
tool model is fine-tuned on the LLM's stage-1 pairs and stage-2 reformulations that passed the
Limited-Consistency judge (score >= 3), checked against the LLM on the judge's histogram
(Table 1), and served W8A8-quantized. The loop here:

- ``dataset``: judged generation directories (``tools/synthesize.py --task maga --judge``) ->
  SFT examples (chat messages + completion), judge filter and held-out hygiene applied;
- ``sft``: supervised fine-tuning of a Hugging Face causal LM, loss on the completion only;
- ``quantize``: int8 dynamic quantization for CPU/transformers serving (torchao), and the
  SmoothQuant + W8A8 export that vLLM serves on GPU (llm-compressor);
- ``report``: the judge histogram of the tool model next to the teacher's (Table 1).

The tool model then runs as the maga generator:
``tools/synthesize.py --task maga --backend transformers --model TOOL --backend-arg quantize=int8``
(or ``--backend vllm --model TOOL-w8a8`` on GPU).
"""
