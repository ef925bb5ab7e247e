"""GGUF files of a full-precision Llama-architecture model, quantized to llama.cpp block types with the `gguf` library.

For audits of llama.cpp-style quantization without llama.cpp (`aaq audit`, `benchmarks/audit_example.py`): the
weights are written the way llama.cpp's `convert_hf_to_gguf.py` writes them (llama.cpp tensor names, the query
and key rows permuted into its rotary layout, which transformers undoes when it reads the file) and quantized by
`gguf.quants.quantize`, llama.cpp's reference quantizers ported to numpy. Every linear weight of the decoder
takes the file type; the token embeddings (also the output layer of a model with tied embeddings) take Q8_0 when
the file type is coarser, as llama.cpp keeps its output tensor at a higher precision (it uses Q6_K, which `gguf`
cannot write); norms stay F32. The tokenizer goes into the file as llama.cpp's `gpt2` (byte-level BPE) vocabulary.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from aaq.errors import AaqError
from aaq.runs.records import write_atomic

try:
    import gguf
except ImportError:  # an optional dependency: only GGUF files need it
    raise AaqError("writing GGUF files needs the `gguf` package; pip install gguf") from None

# The block types `gguf.quants.quantize` can write, by the name llama.cpp gives the file type.
FILE_TYPES = {
    "Q8_0": (gguf.GGMLQuantizationType.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
    "Q5_1": (gguf.GGMLQuantizationType.Q5_1, gguf.LlamaFileType.MOSTLY_Q5_1),
    "Q5_0": (gguf.GGMLQuantizationType.Q5_0, gguf.LlamaFileType.MOSTLY_Q5_0),
    "Q4_1": (gguf.GGMLQuantizationType.Q4_1, gguf.LlamaFileType.MOSTLY_Q4_1),
    "Q4_0": (gguf.GGMLQuantizationType.Q4_0, gguf.LlamaFileType.MOSTLY_Q4_0),
    "F16": (gguf.GGMLQuantizationType.F16, gguf.LlamaFileType.MOSTLY_F16),
}
EMBEDDING_TYPE = gguf.GGMLQuantizationType.Q8_0
# llama.cpp's token types (gguf.TokenType): a plain token, a special (control) token, a user-added one.
NORMAL, CONTROL, USER_DEFINED = gguf.TokenType.NORMAL, gguf.TokenType.CONTROL, gguf.TokenType.USER_DEFINED


def _permute_rotary_rows(weight: np.ndarray, heads: int) -> np.ndarray:
    """Rows of a query or key projection in llama.cpp's rotary layout (each head's two halves interleaved)."""
    return weight.reshape(heads, 2, weight.shape[0] // heads // 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _block_type(name: str, values: np.ndarray, file_type: str) -> gguf.GGMLQuantizationType:
    """The block type a tensor is stored in: F32 for vectors, Q8_0 (or the file's, if finer) for the embeddings, else the file's."""
    if values.ndim == 1:
        return gguf.GGMLQuantizationType.F32
    block, _ = FILE_TYPES[file_type]
    if name == "token_embd.weight" and file_type not in ("Q8_0", "F16"):
        return EMBEDDING_TYPE
    return block


def _vocabulary(tokenizer: PreTrainedTokenizerBase) -> tuple[list[str], list[int], list[str]]:
    """The tokens by id, their llama.cpp token types and the BPE merges of a byte-level BPE tokenizer."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    model = json.loads(backend.to_str())["model"] if backend is not None else {}
    if model.get("type") != "BPE":
        raise AaqError("writing GGUF needs a byte-level BPE tokenizer (llama.cpp's gpt2 vocabulary); convert the model with llama.cpp instead")
    tokens = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    added = set(tokenizer.added_tokens_decoder)
    types = [CONTROL if i in special else USER_DEFINED if i in added else NORMAL for i in range(len(tokens))]
    merges = [" ".join(pair) if isinstance(pair, list) else pair for pair in model.get("merges", [])]
    return tokens, [int(t) for t in types], merges


def _add_metadata(writer: gguf.GGUFWriter, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, file_type: str, pre_tokenizer: str) -> None:
    config = model.config
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_name(str(getattr(config, "_name_or_path", "") or "model"))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(FILE_TYPES[file_type][1])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, types, merges = _vocabulary(tokenizer)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre_tokenizer)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    for token_id, add in ((tokenizer.bos_token_id, writer.add_bos_token_id), (tokenizer.eos_token_id, writer.add_eos_token_id),
                          (tokenizer.unk_token_id, writer.add_unk_token_id), (tokenizer.pad_token_id, writer.add_pad_token_id)):  # fmt: skip
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


def _tensors(model: PreTrainedModel, file_type: str):
    """Each tensor of the file: its llama.cpp name, its stored data and block type."""
    config = model.config
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    state = model.state_dict()
    if config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    for hf_name, tensor in state.items():
        name = names.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if name is None:
            raise AaqError(f"no llama.cpp tensor name for {hf_name}; writing GGUF supports the Llama architecture only")
        values = tensor.detach().to(torch.float32).cpu().numpy()
        if name.endswith("attn_q.weight"):
            values = _permute_rotary_rows(values, config.num_attention_heads)
        elif name.endswith("attn_k.weight"):
            values = _permute_rotary_rows(values, config.num_key_value_heads)
        block = _block_type(name, values, file_type)
        yield name, values if block == gguf.GGMLQuantizationType.F32 else gguf.quants.quantize(values, block), block


def write_gguf(
    model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, path: str | Path, file_type: str = "Q8_0", pre_tokenizer: str = "default"
) -> Path:
    """Write `model` (Llama architecture) with `tokenizer` as a GGUF file of llama.cpp file type `file_type`; returns the path.

    `pre_tokenizer`: llama.cpp's name of the tokenizer's pre-tokenizer (`tokenizer.ggml.pre`, e.g. "smollm"; what
    llama.cpp itself would use, transformers ignores it). Refuses to replace an existing file.
    """
    path = Path(path)
    if file_type not in FILE_TYPES:
        raise AaqError(f"cannot write GGUF file type {file_type!r} with the gguf library; use one of {', '.join(FILE_TYPES)}")
    if model.config.model_type != "llama":
        raise AaqError(f"writing GGUF supports Llama-architecture models, not {model.config.model_type!r}; convert it with llama.cpp's convert_hf_to_gguf.py")
    if path.exists():
        raise AaqError(f"{path} exists; aaq does not replace files it did not write, choose another path or remove it")

    def write(tmp: Path) -> None:
        writer = gguf.GGUFWriter(tmp, gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.LLAMA])
        _add_metadata(writer, model, tokenizer, file_type, pre_tokenizer)
        for name, data, block in _tensors(model, file_type):
            writer.add_tensor(name, data, raw_dtype=None if block == gguf.GGMLQuantizationType.F32 else block)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()

    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, write)
    return path
