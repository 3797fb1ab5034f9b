"""llama2.c export: the version-0 `model.bin` that llama2.c's run.c reads, and its `tokenizer.bin`.

model.bin: a header of 7 int32 (dim, hidden_dim, n_layers, n_heads, n_kv_heads, vocab_size, max_seq_len), vocab_size
negative when the classifier is not the embedding; then float32 tensors in run.c's order: token embedding, every
layer's attention RMSNorm weight, then wq of all layers, wk, wv, wo, the FFN RMSNorm weights, w1, w2, w3, the final
RMSNorm weight, the RoPE tables freq_cis_real and freq_cis_imag (max_seq_len x head_dim/2 each; run.c skips them),
and the classifier when untied. run.c rotates interleaved pairs (2j, 2j+1) where our RoPE rotates halves (j,
j + head_dim/2), so the rows of wq and wk are permuted within each head.

tokenizer.bin: int32 max_token_length, then per id: float32 score, int32 byte length, the bytes. run.c encodes by
repeatedly merging the adjacent pair whose concatenation has the highest score, so BPE tokens score -(merge rank).

Only what run.c computes can be exported: a LLaMA recipe with RoPE base 10000 and no scaling, head_dim = dim/n_heads,
RMSNorm eps 1e-5, no biases and a tied or untied (not pinv) head. run.c also assumes llama2.c's sentencepiece layout
(BOS = 1, a " " dummy prefix before the prompt, byte fallback at id byte+3): the llama2c-* recipes keep
<unk> <s> </s> at ids 0/1/2; for other tokenizers the weights run but run.c's own prompt encoding differs from tinylm's.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

from tinylm.data.tokenizer import byte_to_unicode
from tinylm.errors import TinylmError
from tinylm.models import ARCHITECTURES, rope
from tinylm.recipe import Recipe
from tinylm.storage.atomic import atomic_directory

RUN_C_ROPE_BASE = 10000.0
UNREACHABLE = -1e10  # run.c merges only scores strictly above -1e10: these ids are never produced by a merge


def llama2c_problems(recipe: Recipe) -> list[str]:
    """Why run.c cannot compute this recipe's model (empty when it can)."""
    m = recipe.model
    if ARCHITECTURES[m.arch].family != "llama":
        return [f"llama2.c runs LLaMA-style decoders only, not {ARCHITECTURES[m.arch].__name__}"]
    problems = []
    if m.rope_theta != RUN_C_ROPE_BASE:
        problems.append(f"run.c hard-codes RoPE base 10000 (this recipe: {m.rope_theta:g})")
    if m.rope_scaling != "none":
        problems.append(f"run.c has no RoPE scaling (this recipe: {m.rope_scaling})")
    if m.dim % m.n_heads or m.resolved_head_dim() != m.dim // m.n_heads:
        problems.append(f"run.c needs head_dim = dim / n_heads (this recipe: {m.resolved_head_dim()})")
    if m.w1_bias:
        problems.append("run.c has no bias on w1")
    if m.unembedding == "pinv":
        problems.append("run.c has no pseudo-inverse unembedding (export to hf instead: it stores pinv(E)^T)")
    if m.norm_eps != 1e-5:
        problems.append(f"run.c hard-codes RMSNorm eps 1e-5 (this recipe: {m.norm_eps:g})")
    return problems


def write_model_bin(model, path: str | Path) -> None:
    c = model.config
    hd, kv = c.resolved_head_dim(), c.resolved_kv_heads()
    tied = c.unembedding == "tied"
    sd = {k: v.detach().to("cpu", torch.float32) for k, v in model.state_dict().items()}
    layers = range(c.n_layers)

    def per_layer(name: str, fix=None) -> list[torch.Tensor]:
        return [fix(sd[f"layers.{i}.{name}"]) if fix else sd[f"layers.{i}.{name}"] for i in layers]

    angles = rope.angles(0, c.context_length, rope.inverse_frequencies(hd, RUN_C_ROPE_BASE))
    tensors = [sd["tok_embeddings.weight"], *per_layer("attention_norm.weight"),
               *per_layer("attention.wq.weight", lambda w: rope.interleave_rows(w, c.n_heads, hd)),
               *per_layer("attention.wk.weight", lambda w: rope.interleave_rows(w, kv, hd)),
               *per_layer("attention.wv.weight"), *per_layer("attention.wo.weight"), *per_layer("ffn_norm.weight"),
               *per_layer("feed_forward.w1.weight"), *per_layer("feed_forward.w2.weight"),
               *per_layer("feed_forward.w3.weight"), sd["norm.weight"], angles.cos(), angles.sin()]
    if not tied:
        tensors.append(sd["output.weight"])
    header = struct.pack("<7i", c.dim, c.resolved_hidden_dim(), c.n_layers, c.n_heads, kv,
                         c.vocab_size if tied else -c.vocab_size, c.context_length)
    with open(path, "wb") as handle:
        handle.write(header)
        for tensor in tensors:
            handle.write(tensor.contiguous().numpy().astype("<f4").tobytes())


def tokenizer_bin_entries(tokenizer, vocab_size: int) -> list[tuple[bytes, float]]:
    """(bytes, score) for every model id: BPE tokens score -(merge rank); special and unused ids are unreachable."""
    definition = json.loads(tokenizer.to_json())
    vocab: dict[str, int] = definition["model"].get("vocab") or {}
    byte_level = tokenizer.kind in ("bytes", "bpe", "gpt2")
    to_byte = {symbol: b for b, symbol in byte_to_unicode().items()}
    pieces: dict[int, bytes] = {}
    for symbol, token_id in vocab.items():
        pieces[token_id] = bytes(to_byte[ch] for ch in symbol) if byte_level else symbol.encode("utf-8")
    scores = {token_id: 0.0 for token_id in pieces}
    for rank, merge in enumerate(definition["model"].get("merges") or []):
        left, right = merge.split(" ", 1) if isinstance(merge, str) else merge
        merged = vocab.get(left + right)
        if merged is not None:
            scores[merged] = -float(rank)
    roles = {tokenizer.bos_id: b"\n<s>\n", tokenizer.eos_id: b"\n</s>\n"}  # llama2.c prints them on their own lines
    for token, token_id in tokenizer.special_ids.items():
        pieces[token_id] = roles.get(token_id) or token.encode("utf-8")
        scores[token_id] = UNREACHABLE
    entries = []
    for token_id in range(vocab_size):
        piece = pieces.get(token_id) or f"<unused{token_id}>".encode()  # run.c cannot read an empty piece
        entries.append((piece, scores.get(token_id, UNREACHABLE)))
    return entries


def write_tokenizer_bin(tokenizer, vocab_size: int, path: str | Path) -> None:
    entries = tokenizer_bin_entries(tokenizer, vocab_size)
    with open(path, "wb") as handle:
        handle.write(struct.pack("<i", max(len(piece) for piece, _ in entries)))
        for piece, score in entries:
            handle.write(struct.pack("<fi", score, len(piece)))
            handle.write(piece)


def export_llama2c_model(model, recipe: Recipe, tokenizer, out_dir: str | Path) -> list[str]:
    """Write out_dir/model.bin and out_dir/tokenizer.bin; returns lines worth printing (what run.c does differently)."""
    problems = llama2c_problems(recipe)
    if problems:
        raise TinylmError(f"recipe '{recipe.name}' cannot be exported for llama2.c: {'; '.join(problems)}")
    notes = []
    if tokenizer.bos_id != 1:
        notes.append(f"run.c starts every sequence with id 1 as BOS; this tokenizer's BOS is {tokenizer.bos_id}")
    if tokenizer.kind != "chars":
        notes.append("run.c puts a ' ' token before the prompt (sentencepiece's dummy prefix); tinylm does not")
    with atomic_directory(out_dir, kind="tinylm llama2c export") as tmp:
        write_model_bin(model, tmp / "model.bin")
        write_tokenizer_bin(tokenizer, recipe.model.vocab_size, tmp / "tokenizer.bin")
    return [f"wrote {out_dir}/model.bin and {out_dir}/tokenizer.bin for llama2.c's run.c",
            *(f"note: {n}" for n in notes)]
