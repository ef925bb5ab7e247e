"""Write a randomly initialised Llama of a chosen size, with the smollm2 tokenizer, to a local folder.

Step time and memory do not depend on the weight values, so a random model measures how the
benchmarks scale beyond the one real model these machines carry (smollm2-135m):

    python benchmarks/random_model.py --out /tmp/llama-1b      # ~1B parameters, 3.9 GB fp32
    OMP_NUM_THREADS=1 python benchmarks/calibration_step.py --model /tmp/llama-1b --out /tmp/step_1b.json
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from aaq.models.loading import load_model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder to write (config, safetensors, tokenizer)")
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=6144)
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    _, tokenizer = load_model("smollm2-135m-instruct")
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(args.seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    print(f"{sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters in {args.out}")


if __name__ == "__main__":
    main()
