"""GGUF export: one `.gguf` file that llama.cpp (and so Ollama, LM Studio, llama-cpp-python) runs and that
transformers loads with `from_pretrained(dir, gguf_file=name)`.

The file uses llama.cpp's `llama` architecture:
- Metadata `llama.*`: context length (RoPE-scaled recipes: the extended one), widths, heads, KV heads, the head size
  (`attention.key_length`/`value_length` and `rope.dimension_count`, so head_dim need not be dim / n_heads), the RoPE
  base (NTK-scaled recipes: the stretched base, which is all our static NTK scaling is), linear RoPE scaling as
  `rope.scaling.type = "linear"` + `rope.scaling.factor`, the RMSNorm epsilon and the vocabulary size.
- Tensors under llama.cpp's names. llama.cpp rotates interleaved pairs (2j, 2j+1) where our RoPE rotates halves
  (j, j + head_dim/2), so the rows of wq and wk are permuted within each head, as llama.cpp's own converter does for
  Hugging Face Llama weights. Tied heads write no `output` (llama.cpp reuses `token_embd`); a pinv head is written as
  an explicit `output` matrix, pinv(E)^T. The w1 bias is `blk.N.ffn_gate.bias`, which llama.cpp's llama
  architecture adds before the SiLU (transformers' GGUF loader drops it: check such files with llama.cpp).
- dtype "f32"; "f16" (matrices f16, norms and biases f32); "q8_0" (matrices whose rows are a multiple of 32 values
  quantised with gguf's reference Q8_0, the rest f16; norms and biases f32).
- The tokenizer as `tokenizer.ggml.model = "gpt2"` (byte-level BPE; kinds bpe, bytes and gpt2): tokens spelled in the
  byte-level alphabet, merges, special tokens typed CONTROL, padding rows up to the model's vocabulary UNUSED, and
  `tokenizer.ggml.pre = "gpt-2"`, llama.cpp's name for exactly GPT-2's split, which is what our ByteLevel(use_regex)
  pre-tokenizer applies.
- Story framing: the BOS token is the recipe's one-token frame prefix and `add_bos_token` is set, so llama.cpp starts
  prompts as tinylm does. tinylm ends a story at BOS or EOS; llama.cpp ends generation at `eos_token_id` and
  `eot_token_id`, so eos is the token that ends a story in training (BOS for bos framing, since each story ends
  where the next one starts; EOS for eos framing) and eot the other one.
- Sampling defaults from the recipe as `general.sampling.*` (llama.cpp uses them when the user sets none), with
  the sampler order tinylm and transformers use: penalties, temperature, top-k, top-p, min-p.

What GGUF cannot hold is refused (see `gguf_problems`): MicroMixer, character vocabularies, suffix-space BPE,
the trailing-space normaliser and sink framing. out_dir holds the one file and a manifest.json, and is replaced
whole by the next export into it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from tinylm.data.shards import frame_prefix
from tinylm.data.tokenizer import byte_to_unicode
from tinylm.errors import TinylmError
from tinylm.export import GGUF_DTYPES as DTYPES
from tinylm.models import ARCHITECTURES, rope
from tinylm.recipe import Recipe
from tinylm.storage.atomic import atomic_directory

PRE_TOKENIZER = "gpt-2"  # llama.cpp: LLAMA_VOCAB_PRE_TYPE_GPT2, GPT-2's regex split
SAMPLER_SEQUENCE = "penalties;temperature;top_k;top_p;min_p"  # transformers' (and tinylm's) order
Q8_BLOCK = 32
RECIPE_KEY = "tinylm.recipe"  # the whole recipe as JSON (llama.cpp ignores keys it does not know)


# ---------------------------------------------------------------------------------------------------- what fits
def gguf_problems(recipe: Recipe, tokenizer=None) -> list[str]:
    """Why this recipe (and tokenizer, when given) cannot be written as a faithful GGUF; empty when it can."""
    architecture = ARCHITECTURES[recipe.model.arch]
    if architecture.family != "llama":
        return [f"{architecture.__name__} has no GGUF architecture (llama.cpp runs LLaMA-style decoders); export it "
                "with --format hf"]
    config = recipe.tokenizer
    kind = tokenizer.kind if tokenizer is not None else config.kind
    meta = tokenizer.meta if tokenizer is not None else {}
    problems = []
    if kind == "chars":
        problems.append("a character vocabulary has no GGUF form (llama.cpp has no word-level tokenizer, and its "
                        "sentencepiece one needs <0xXX> byte tokens for characters outside the vocabulary, where "
                        "tinylm reads <unk>)")
    if meta.get("suffix_space", config.suffix_space):
        problems.append("suffix-space BPE splits words with their trailing space, a pre-tokenizer llama.cpp does "
                        "not have")
    if meta.get("trailing_space_normalizer", config.trailing_space_normalizer):
        problems.append("the trailing-space normaliser has no GGUF form (llama.cpp's BPE tokenizers normalise "
                        "nothing)")
    if recipe.data.framing == "sink_bos":
        problems.append("sink_bos framing starts every block with two tokens (sink, BOS); llama.cpp adds one BOS")
    if tokenizer is not None and not problems and kind != "chars":
        problems += _tokenizer_definition_problems(tokenizer)
    return problems


def _tokenizer_definition_problems(tokenizer) -> list[str]:
    """A byte-level BPE whose split llama.cpp's "gpt-2" pre-tokenizer reproduces (or with no merges to split for)."""
    definition = json.loads(tokenizer.to_json())
    model = definition.get("model") or {}
    if model.get("type") != "BPE":
        return [f"a {model.get('type')} tokenizer model has no GGUF form here (byte-level BPE only)"]
    if definition.get("normalizer") is not None:
        return ["a tokenizer normaliser has no GGUF form (llama.cpp's BPE tokenizers normalise nothing)"]
    pre = definition.get("pre_tokenizer") or {}
    gpt2_split = pre.get("type") == "ByteLevel" and pre.get("use_regex", True) and not pre.get("add_prefix_space")
    if model.get("merges") and not gpt2_split:
        return [("this tokenizer's pre-tokenizer is not GPT-2's byte-level split, the one llama.cpp's 'gpt-2' "
                 "pre-tokenizer reproduces")]
    alphabet = set(byte_to_unicode().values())
    if any(not set(symbol) <= alphabet for symbol in model.get("vocab") or {}):
        return ["this tokenizer's vocabulary is not spelled in the byte-level alphabet"]
    return []


# --------------------------------------------------------------------------------------------------- tensors
def gguf_tensor_names(config) -> dict[str, str]:
    """llama.cpp tensor name -> our state_dict name ("" for the computed pinv head)."""
    names = {"token_embd.weight": "tok_embeddings.weight", "output_norm.weight": "norm.weight"}
    if config.unembedding == "untied":
        names["output.weight"] = "output.weight"
    elif config.unembedding == "pinv":
        names["output.weight"] = ""
    per_layer = {"attn_norm.weight": "attention_norm.weight", "attn_q.weight": "attention.wq.weight",
                 "attn_k.weight": "attention.wk.weight", "attn_v.weight": "attention.wv.weight",
                 "attn_output.weight": "attention.wo.weight", "ffn_norm.weight": "ffn_norm.weight",
                 "ffn_gate.weight": "feed_forward.w1.weight", "ffn_up.weight": "feed_forward.w3.weight",
                 "ffn_down.weight": "feed_forward.w2.weight"}
    if config.w1_bias:
        per_layer["ffn_gate.bias"] = "feed_forward.w1.bias"
    for i in range(config.n_layers):
        names.update({f"blk.{i}.{ours}": f"layers.{i}.{theirs}" for ours, theirs in per_layer.items()})
    return names


def storage_type(shape: tuple[int, ...], dtype: str) -> str:
    """How one tensor is stored: "f32", "f16" or "q8_0" (1-D tensors stay f32 whatever the file's dtype)."""
    if dtype == "f32" or len(shape) < 2:
        return "f32"
    if dtype == "q8_0" and shape[-1] % Q8_BLOCK == 0:
        return "q8_0"
    return "f16"


def _tensors(model) -> dict[str, torch.Tensor]:
    """Every GGUF tensor, float32 on the CPU, q and k rows permuted for llama.cpp's RoPE."""
    c = model.config
    hd = c.resolved_head_dim()
    ours = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    out = {}
    for gguf_name, name in gguf_tensor_names(c).items():
        if not name:  # pinv: the matrix the model computes on every call, written once
            with torch.no_grad():
                tensor = model.unembedding_matrix().detach().to("cpu", torch.float32)
        else:
            tensor = ours[name]
        if gguf_name.endswith("attn_q.weight"):
            tensor = rope.interleave_rows(tensor, c.n_heads, hd)
        elif gguf_name.endswith("attn_k.weight"):
            tensor = rope.interleave_rows(tensor, c.resolved_kv_heads(), hd)
        out[gguf_name] = tensor.contiguous()
    return out


# --------------------------------------------------------------------------------------------------- tokenizer
def _token_ids(tokenizer, recipe: Recipe) -> dict[str, int | None]:
    """bos (what llama.cpp puts before a prompt), eos and eot (where llama.cpp stops), unk and pad."""
    prefix = frame_prefix(tokenizer, recipe.data.framing)
    bos, eos = tokenizer.bos_id, tokenizer.eos_id
    story_end = {"bos": bos, "eos": eos}.get(recipe.data.framing, eos)
    other_end = next((i for i in (eos, bos) if i is not None and i != story_end), None)
    return {"bos": prefix[0] if len(prefix) == 1 else bos, "add_bos": len(prefix) == 1,
            "eos": story_end, "eot": other_end, "unk": tokenizer.unk_id, "pad": tokenizer.pad_id}


def gguf_vocabulary(tokenizer, vocab_size: int) -> tuple[list[str], list[int], list[str]]:
    """(tokens, token types, merges) for `tokenizer.ggml.*`: one token per model id (padding rows `[PADn]`)."""
    from gguf import TokenType

    definition = json.loads(tokenizer.to_json())
    tokens: list[str | None] = [None] * vocab_size
    types = [int(TokenType.UNUSED)] * vocab_size
    for symbol, token_id in (definition["model"].get("vocab") or {}).items():
        tokens[token_id], types[token_id] = symbol, int(TokenType.NORMAL)
    for token_id in tokenizer.special_ids.values():
        tokens[token_id], types[token_id] = tokenizer.id_to_token(token_id), int(TokenType.CONTROL)
    for added in definition.get("added_tokens") or []:  # added but not special: llama.cpp matches them whole too
        if tokens[added["id"]] is None or types[added["id"]] == int(TokenType.UNUSED):
            tokens[added["id"]] = added["content"]
            types[added["id"]] = int(TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED)
    taken = {t for t in tokens if t is not None}
    for token_id, token in enumerate(tokens):
        if token is None:
            name = f"[PAD{token_id}]"
            while name in taken:
                name = f"[{name}]"
            tokens[token_id] = name
            taken.add(name)
    seen: dict[str, int] = {}
    for token_id, token in enumerate(tokens):
        if token in seen:
            raise TinylmError(f"tokenizer: ids {seen[token]} and {token_id} are both {token!r}; GGUF looks tokens "
                              "up by their text")
        seen[token] = token_id
    merges = [m if isinstance(m, str) else " ".join(m) for m in definition["model"].get("merges") or []]
    return tokens, types, merges  # type: ignore[return-value]


# ------------------------------------------------------------------------------------------------------ writing
def _writer_class():
    from gguf import GGUFValueType, GGUFWriter

    class Writer(GGUFWriter):
        """gguf's writer refuses empty arrays; llama.cpp needs `tokenizer.ggml.merges` even when it is empty (a
        byte vocabulary), and reads an empty one fine."""

        def _pack_val(self, val, vtype, add_vtype, sub_type=None):
            if vtype == GGUFValueType.ARRAY and sub_type is not None and len(val) == 0:
                head = self._pack("I", vtype) if add_vtype else b""
                return head + self._pack("I", sub_type) + self._pack("Q", 0)
            return super()._pack_val(val, vtype, add_vtype, sub_type)

    return Writer


def _file_name(recipe: Recipe, dtype: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "-", recipe.name).strip("-.") or "model"
    return f"{stem}-{dtype}.gguf"


def _write(path: Path, model, recipe: Recipe, tokenizer, dtype: str) -> list[str]:
    writer = _writer_class()(str(path), "llama")
    _write_architecture(writer, model, recipe, dtype)
    notes = _write_tokenizer(writer, tokenizer, recipe)
    _write_sampling(writer, recipe)
    kept = _write_tensors(writer, model, dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    if kept:
        notes.append(f"q8_0 needs rows of a multiple of {Q8_BLOCK} values: kept as f16: {', '.join(kept[:4])}"
                     + (f" and {len(kept) - 4} more" if len(kept) > 4 else ""))
    return notes


def _write_architecture(writer, model, recipe: Recipe, dtype: str) -> None:
    import gguf

    m, hd = recipe.model, recipe.model.resolved_head_dim()
    writer.add_name(recipe.name)
    if recipe.source:
        writer.add_description(f"tinylm recipe '{recipe.name}' ({recipe.source})")
    writer.add_file_type({"f32": gguf.LlamaFileType.ALL_F32, "f16": gguf.LlamaFileType.MOSTLY_F16,
                          "q8_0": gguf.LlamaFileType.MOSTLY_Q8_0}[dtype])
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    writer.add_context_length(model.max_positions)
    writer.add_embedding_length(m.dim)
    writer.add_block_count(m.n_layers)
    writer.add_feed_forward_length(m.resolved_hidden_dim())
    writer.add_head_count(m.n_heads)
    writer.add_head_count_kv(m.resolved_kv_heads())
    writer.add_key_length(hd)
    writer.add_value_length(hd)
    writer.add_rope_dimension_count(hd)
    writer.add_rope_freq_base(rope.scaled_base(m))  # static NTK-aware scaling is a stretched base and nothing else
    if m.rope_scaling == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(m.rope_scaling_factor)
        writer.add_rope_scaling_orig_ctx_len(m.context_length)
    writer.add_layer_norm_rms_eps(m.norm_eps)
    writer.add_vocab_size(m.vocab_size)
    writer.add_string(RECIPE_KEY, json.dumps(recipe.to_dict(), sort_keys=True))


def _write_tokenizer(writer, tokenizer, recipe: Recipe) -> list[str]:
    """The vocabulary and the ids that start and end a story; returns notes worth printing."""
    import gguf

    ids = _token_ids(tokenizer, recipe)
    tokens, types, merges = gguf_vocabulary(tokenizer, recipe.model.vocab_size)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(PRE_TOKENIZER)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_key_value(gguf.Keys.Tokenizer.MERGES, merges, gguf.GGUFValueType.ARRAY,
                         sub_type=gguf.GGUFValueType.STRING)
    notes = []
    if ids["eos"] is None:  # llama.cpp's gpt2 vocabulary would otherwise end generation at its default id 11
        ids["eos"] = _unseen_id(tokens, types)
        notes.append(f"no end-of-story token: eos is set to id {ids['eos']} ({tokens[ids['eos']]!r}), which stories "
                     "never contain, so llama.cpp does not stop at its default id 11")
    if ids["bos"] is None:
        ids["bos"] = ids["eos"]
    writer.add_bos_token_id(ids["bos"])
    writer.add_eos_token_id(ids["eos"])
    for role, add in (("eot", writer.add_eot_token_id), ("unk", writer.add_unk_token_id),
                      ("pad", writer.add_pad_token_id)):
        if ids[role] is not None:
            add(ids[role])
    writer.add_add_bos_token(ids["add_bos"])
    writer.add_add_eos_token(False)
    return notes


def _write_sampling(writer, recipe: Recipe) -> None:
    s = recipe.sample
    writer.add_sampling_sequence(SAMPLER_SEQUENCE)
    writer.add_sampling_temp(s.temperature)
    writer.add_sampling_top_k(s.top_k)  # 0 is "off" in llama.cpp as in tinylm (its default would be 40)
    writer.add_sampling_top_p(s.top_p)
    writer.add_sampling_min_p(s.min_p)  # written even at 0: llama.cpp's default is 0.05
    writer.add_sampling_penalty_repeat(s.repetition_penalty)
    writer.add_sampling_penalty_last_n(-1)  # tinylm penalises every id seen, prompt included


def _write_tensors(writer, model, dtype: str) -> list[str]:
    """Every tensor in its storage type; returns the matrices q8_0 had to keep as f16."""
    import gguf
    import numpy as np

    kept = []
    for name, tensor in _tensors(model).items():
        kind = storage_type(tuple(tensor.shape), dtype)
        array = tensor.numpy()
        if kind == "q8_0":
            writer.add_tensor(name, gguf.quants.quantize(array, gguf.GGMLQuantizationType.Q8_0),
                              raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:
            writer.add_tensor(name, array.astype(np.float16 if kind == "f16" else np.float32))
            if dtype == "q8_0" and len(tensor.shape) == 2:
                kept.append(name)
    return kept


def _unseen_id(tokens: list[str], types: list[int]) -> int:
    """An id stories never contain: a padding row, else the NUL byte's token."""
    from gguf import TokenType

    unused = [i for i, t in enumerate(types) if t == TokenType.UNUSED]
    nul = byte_to_unicode()[0]
    return unused[0] if unused else tokens.index(nul) if nul in tokens else 0


def export_gguf_model(model, recipe: Recipe, tokenizer, out_dir: str | Path, dtype: str = "f32") -> list[str]:
    """Write out_dir/<recipe name>-<dtype>.gguf (and manifest.json), replacing out_dir; returns lines to print."""
    if dtype not in DTYPES:
        raise TinylmError(f"GGUF dtype must be one of {', '.join(DTYPES)}, got '{dtype}'")
    problems = gguf_problems(recipe, tokenizer)
    if problems:
        raise TinylmError(f"recipe '{recipe.name}' cannot be exported to GGUF: {'; '.join(problems)}")
    try:
        import gguf  # noqa: F401
    except ImportError:
        raise TinylmError("GGUF export needs the gguf package (pip install gguf)") from None
    out_dir = Path(out_dir)
    name = _file_name(recipe, dtype)
    with atomic_directory(out_dir) as tmp:
        notes = _write(tmp / name, model, recipe, tokenizer, dtype)
    path = out_dir / name
    ids = _token_ids(tokenizer, recipe)
    lines = [f"wrote {path} ({path.stat().st_size / 2**20:.1f} MiB, {dtype}, llama architecture)"]
    start = f"prompts start with {tokenizer.id_to_token(ids['bos'])!r}" if ids["add_bos"] else "no BOS is added"
    ends = [tokenizer.id_to_token(i) for i in (ids["eos"], ids["eot"]) if i is not None]
    lines.append(f"tokenizer: byte-level BPE, pre-tokenizer '{PRE_TOKENIZER}'; {start}"
                 + (f"; generation stops at {' or '.join(repr(e) for e in ends)}" if ends else ""))
    if recipe.model.rope_scaling == "linear":
        lines.append("transformers' GGUF loader ignores llama.rope.scaling.*: run this file with llama.cpp")
    if recipe.model.w1_bias:
        lines.append("transformers' GGUF loader drops blk.N.ffn_gate.bias: run this file with llama.cpp")
    return lines + notes


__all__ = ["DTYPES", "PRE_TOKENIZER", "export_gguf_model", "gguf_problems", "gguf_tensor_names",
           "gguf_vocabulary", "storage_type"]
