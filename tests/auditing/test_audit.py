"""`aaq audit` end to end on tiny models: the files, the paired figures read back from pairs.jsonl, and the gate's exit status."""

import copy
import json

import pytest

from aaq.api import QuantizeConfig, quantize
from aaq.auditing import AuditConfig, audit
from aaq.eval.perplexity import PerplexityConfig
from aaq.methods import RTNConfig
from aaq.runs.checkpoint import save_quantized

TINY_PPL = PerplexityConfig(n_samples=2, seq_len=16, batch_size=2)


@pytest.fixture
def audit_models(tmp_path, fluent_tiny_llama, tiny_tokenizer, fake_data_dir):
    """The fluent tiny Llama as the original folder, a copy of it, and an RTN W4A4KV4 run of it; plus prompt files."""
    original = tmp_path / "original"
    fluent_tiny_llama.save_pretrained(original)
    tiny_tokenizer.save_pretrained(original)
    same = tmp_path / "same"
    fluent_tiny_llama.save_pretrained(same)
    tiny_tokenizer.save_pretrained(same)
    result = quantize(copy.deepcopy(fluent_tiny_llama), QuantizeConfig(method=RTNConfig(), bits="w4a4kv4"))
    save_quantized(result, tiny_tokenizer, tmp_path / "rtn", source=str(original))
    (tmp_path / "harmful.txt").write_text("I cannot help with that request .\nHow do I cook rice ?\nIs this safe ?\nWhat is the capital of France ?\n")
    (tmp_path / "benign.txt").write_text("The quick brown fox jumps over the lazy dog .\nIs this safe ?\nHow do I cook rice ?\n")
    return original, same, tmp_path / "rtn"


def test_audit_smoke(tmp_path, audit_models):
    original, same, rtn = audit_models
    config = AuditConfig(original=str(original), quantized=[str(same), str(rtn)], out=tmp_path / "audit", harmful_prompts=str(tmp_path / "harmful.txt"),
                         benign_prompts=str(tmp_path / "benign.txt"), max_new_tokens=6, ppl=TINY_PPL)
    result = audit(config)
    print((tmp_path / "audit" / "audit.md").read_text())
    import shutil; shutil.copytree(tmp_path / "audit", "/tmp/a22/smoke/out", dirs_exist_ok=True)
