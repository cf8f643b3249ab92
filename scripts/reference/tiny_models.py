#!/usr/bin/env python3
"""Create the tiny random models and the reference logits the CPU backend is checked against
(tests/fixtures/tiny-llama, tests/fixtures/tiny-qwen2).

    python scripts/reference/tiny_models.py tests/fixtures

Each folder holds a real byte-level BPE tokenizer (trained here on a fixed text, 320 tokens), a
random model created with `transformers`, saved in a half-precision dtype (Llama: bf16, Qwen2:
f16; the engine widens both exactly), and `reference.safetensors` with the float32 logits
`transformers` computes for every position of a few sequences (prompt + 12 greedy tokens),
listed in `cases.json`. The Llama model uses Llama-3 rope scaling with a short original context,
so scaled and unscaled frequencies both matter; the Qwen2 model has Q/K/V biases and tied
embeddings. Needs torch, transformers and tokenizers (run once by a developer; CI reads the
committed files).
"""
import json
import sys
from pathlib import Path

import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, Qwen2Config,
                          Qwen2ForCausalLM)

CORPUS = """The quick brown fox jumps over the lazy dog. A paged KV cache stores keys and values in
fixed-size blocks, and a block table maps each position of a sequence to a block. The scheduler
hands out tokens under a budget: chunked prefills and decodes share one step. Rotary embeddings
rotate pairs of dimensions by an angle that grows with the position. Paris is the capital of
France; Rome is the capital of Italy. Numbers like 12, 345 and 6789 appear too. Héllo wörld, ça va?
""" * 4
PROMPTS = [
    "The scheduler hands out tokens",
    "A paged KV cache stores keys and values in blocks, and",
    "Paris is",
]
CONTINUATION = 12
# A plain role-prefixed template, so the server's chat endpoint can be tested on the tiny models.
CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] | trim }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def tokenizer():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([CORPUS], trainer)
    return tok


def randomize(model, gen):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(0.15 * torch.randn(p.shape, generator=gen))


def build(out, name, config, cls, dtype, tok):
    d = Path(out) / name
    d.mkdir(parents=True, exist_ok=True)
    tok.save(str(d / "tokenizer.json"))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(d / "tokenizer.json"), eos_token="<|endoftext|>")
    gen = torch.Generator().manual_seed(20261127)
    model = cls(config)
    randomize(model, gen)
    model = model.to(dtype)
    config.save_pretrained(d)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(d / "model.safetensors"), metadata={"format": "pt"})
    (d / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|endoftext|>", "chat_template": CHAT_TEMPLATE}) + "\n")
    # Reload exactly what the engine will read, in float32.
    model = cls.from_pretrained(d, dtype=torch.float32).eval()
    tensors, cases = {}, []
    for i, p in enumerate(PROMPTS):
        ids = fast(p, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            full = model.generate(torch.tensor([ids]), max_new_tokens=CONTINUATION, do_sample=False,
                                  min_new_tokens=CONTINUATION, pad_token_id=0)[0]
            logits = model(full[None]).logits[0].float()
        tensors[f"logits.{i}"] = logits.contiguous()
        cases.append({"prompt": p, "prompt_ids": ids, "ids": full.tolist()})
    save_file(tensors, str(d / "reference.safetensors"))
    (d / "cases.json").write_text(json.dumps({"generator": f"transformers {__import__('transformers').__version__}, "
                                              f"torch {torch.__version__}, float32, CPU",
                                              "cases": cases}, indent=1) + "\n")
    print(f"{d}: vocab {config.vocab_size}, {sum(p.numel() for p in model.parameters())} parameters")


def main(out):
    tok = tokenizer()
    vocab = tok.get_vocab_size()
    eos = tok.token_to_id("<|endoftext|>")
    llama = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                        rms_norm_eps=1e-5, tie_word_embeddings=False, eos_token_id=eos, bos_token_id=eos,
                        rope_parameters={"rope_type": "llama3", "rope_theta": 10000.0, "factor": 4.0,
                                         "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 16})
    build(out, "tiny-llama", llama, LlamaForCausalLM, torch.bfloat16, tok)
    qwen = Qwen2Config(vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                       rms_norm_eps=1e-6, tie_word_embeddings=True, eos_token_id=eos, bos_token_id=eos,
                       use_sliding_window=False, rope_parameters={"rope_type": "default", "rope_theta": 1000000.0})
    build(out, "tiny-qwen2", qwen, Qwen2ForCausalLM, torch.float16, tok)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    main(sys.argv[1])
