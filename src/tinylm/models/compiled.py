"""The compiled decode step: the LLaMA decoder's whole one-token step as one call into native code (decode_step.cpp).

The eager FastLlama step spends most of a small model's token in ~150 PyTorch calls of a few microseconds each; this
step makes one. The C++ file is built by the machine's compiler for its own CPU (-march=native, OpenMP) the first time
it is needed and kept in the cache directory, keyed by the source, compiler, flags and CPU; later starts load it.
Weights are packed once per model (float32, or int8 with per-output scales and activations quantised per row: a
quarter of the bytes to read per token). float32 gives the eager step's logits within float rounding, and so its greedy
tokens (tests/test_compiled.py). Without a C++ compiler, or for other architectures and devices, the caller decodes
eagerly after one line on stderr (`compiled_step`).
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn as nn

from tinylm.errors import TinylmError
from tinylm.models import COMPILED_DTYPES as DTYPES
from tinylm.models import rope
from tinylm.models.decode import FastLlama, kept_copy

SOURCE = Path(__file__).with_name("decode_step.cpp")
FLAGS = ["-O3", "-march=native", "-mprefer-vector-width=512", "-fopenmp", "-shared", "-fPIC", "-std=c++17"]
LANES = 16  # outputs per packed block (decode_step.cpp)


class CompileUnavailable(TinylmError):
    """The compiled step cannot be built here (no compiler, or it failed): decode eagerly."""


def cache_dir() -> Path:
    """Where built steps are kept: $TINYLM_CACHE, else $XDG_CACHE_HOME/tinylm, else ~/.cache/tinylm."""
    if os.environ.get("TINYLM_CACHE"):
        return Path(os.environ["TINYLM_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "tinylm"


def check_dtype(dtype: str) -> None:
    if dtype not in DTYPES:
        raise TinylmError(f"the compiled step's dtype is one of {', '.join(DTYPES)}, not {dtype!r}")


def compiler() -> str:
    found = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or shutil.which("clang++")
    if not found or not shutil.which(found):
        raise CompileUnavailable("no C++ compiler found (c++, g++ or clang++; or set CXX)")
    return found


def _cpu_signature() -> str:
    """The CPU's feature flags where the system lists them: -march=native code is only valid on such a CPU."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                return line
    except OSError:
        pass
    return platform.processor() or platform.machine()


def library_path(portable: bool = False) -> Path:
    """Build decode_step.cpp into the cache directory unless an identical build is there; returns the library.
    `portable` leaves out the AVX-512 VNNI intrinsics (the same sums in plain vector code, for tests)."""
    cxx = compiler()
    flags = FLAGS + (["-DTINYLM_PORTABLE"] if portable else [])
    version = subprocess.run([cxx, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), cxx, version, *flags, _cpu_signature()]).encode())
    target = cache_dir() / "compiled" / f"decode_step-{key.hexdigest()[:16]}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:  # built aside, then moved in whole
        built = Path(scratch) / target.name
        run = subprocess.run([cxx, *flags, str(SOURCE), "-o", str(built)], capture_output=True, text=True)
        if run.returncode != 0:
            first = (run.stderr.strip().splitlines() or ["no message"])[0]
            raise CompileUnavailable(f"{cxx} could not build the compiled step: {first}")
        os.replace(built, target)
    return target


class Matrix(ctypes.Structure):
    _fields_ = [("in_", ctypes.c_int32), ("out", ctypes.c_int32), ("blocks", ctypes.c_int32),
                ("in4", ctypes.c_int32), ("f32", ctypes.c_void_p), ("i8", ctypes.c_void_p),
                ("scale", ctypes.c_void_p), ("shift", ctypes.c_void_p), ("bias", ctypes.c_void_p)]


class Layer(ctypes.Structure):
    _fields_ = [("qkv", Matrix), ("wo", Matrix), ("w13", Matrix), ("w2", Matrix)]


class Model(ctypes.Structure):
    _fields_ = [(name, ctypes.c_int32) for name in ("n_layers", "dim", "n_heads", "n_kv_heads", "head_dim", "hidden",
                                                    "vocab", "max_positions")] + [
        ("norm_floor", ctypes.c_float), ("embedding", ctypes.c_void_p), ("cos", ctypes.c_void_p),
        ("sin", ctypes.c_void_p), ("layers", ctypes.POINTER(Layer)), ("head", Matrix)]


class Cache(ctypes.Structure):
    _fields_ = [("keys", ctypes.c_void_p), ("values", ctypes.c_void_p), ("key_strides", ctypes.c_int64 * 4),
                ("value_strides", ctypes.c_int64 * 4)]


def _load(path: Path):
    library = ctypes.CDLL(str(path))
    library.tinylm_step.argtypes = [ctypes.POINTER(Model), ctypes.POINTER(Cache), ctypes.c_int32, ctypes.c_void_p,
                                    ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32]
    library.tinylm_step.restype = ctypes.c_int
    return library


class CompiledLlama:
    """A Llama's weights packed for decode_step.cpp, and `step(ids, cache)` as FastLlama's: one id per row at each
    row's position, (batch, vocab) float32 logits back. The tensors the native step reads are kept here."""

    def __init__(self, model: nn.Module, dtype: str = "float32", portable: bool = False):
        check_dtype(dtype)
        self.library = _load(library_path(portable))
        self.dtype, self.kept = dtype, []
        fast = FastLlama(model)  # the folded (in, out) matrices, shared with the eager step's arithmetic
        c = model.config
        self.vocab = c.vocab_size
        cos_sin = rope.angles(0, model.max_positions, model.inv_freq)
        layers = (Layer * len(fast.layers))(*[
            Layer(self._matrix(wqkv), self._matrix(wo), self._matrix(w13, b13), self._matrix(w2))
            for wqkv, wo, w13, b13, w2 in fast.layers])
        self.model = Model(c.n_layers, c.dim, fast.n_heads, fast.n_kv, fast.head_dim, fast.hidden, c.vocab_size,
                           model.max_positions, float(fast.norm_floor), self._keep(fast.embedding),
                           self._keep(cos_sin.cos()), self._keep(cos_sin.sin()), layers,
                           self._matrix(fast.unembedding))
        self.kept.append(layers)

    def _keep(self, tensor: torch.Tensor, dtype=torch.float32) -> int:
        """A contiguous CPU copy the native step may read for as long as this object lives; its address."""
        tensor = tensor.detach().to("cpu", dtype).contiguous()
        self.kept.append(tensor)
        return tensor.data_ptr()

    def _matrix(self, stored: torch.Tensor, bias: torch.Tensor | None = None) -> Matrix:
        """Pack one (in, out) matrix in decode_step.cpp's layout for this dtype, outputs padded to blocks of 16."""
        n_in, n_out = stored.shape
        blocks = -(-n_out // LANES)
        weight = torch.zeros(blocks * LANES, n_in)
        weight[:n_out] = stored.detach().float().t()
        matrix = Matrix(n_in, n_out, blocks, -(-n_in // 4) * 4)
        if bias is not None:
            matrix.bias = self._keep(bias)
        if self.dtype == "float32":
            matrix.f32 = self._keep(weight.view(blocks, LANES, n_in).transpose(1, 2))
            return matrix
        scale = weight.abs().amax(dim=1) / 127
        scale[scale == 0] = 1.0
        quantised = torch.zeros(blocks * LANES, matrix.in4, dtype=torch.int8)
        quantised[:, :n_in] = torch.round(weight / scale[:, None]).clamp(-127, 127).to(torch.int8)
        matrix.i8 = self._keep(quantised.view(blocks, LANES, -1, 4).transpose(1, 2), torch.int8)
        matrix.scale = self._keep(scale)
        matrix.shift = self._keep(128 * quantised.sum(dim=1, dtype=torch.int32), torch.int32)
        return matrix

    def step(self, ids: torch.Tensor, cache) -> torch.Tensor:
        keys, values = cache.keys, cache.values
        # decode_step.cpp reads keys 16 positions at a time: a row needs room for 16 past its last (the cache's padding)
        if (keys.stride(-1) != 1 or values.stride(-1) != 1 or keys.dtype != torch.float32
                or max(cache.lengths, default=0) + LANES > keys.shape[-1]):
            raise TinylmError("the compiled step needs a float32 KVCache (contiguous rows, padded positions)")
        rows = ids.shape[0]
        ids = ids.to("cpu", torch.int64).contiguous()
        logits = torch.empty(rows, self.vocab)
        native_cache = Cache(keys.data_ptr(), values.data_ptr(), keys.stride()[:4], values.stride()[:4])
        self.library.tinylm_step(ctypes.byref(self.model), ctypes.byref(native_cache), rows, ids.data_ptr(),
                                 (ctypes.c_int64 * rows)(*cache.lengths), logits.data_ptr(), torch.get_num_threads())
        cache.advance(1)
        return logits


_NOTED: set[str] = set()


def _note_once(message: str) -> None:
    if message not in _NOTED:
        _NOTED.add(message)
        print(f"tinylm: {message}; decoding with the eager step", file=sys.stderr)


def compiled_step(model: nn.Module, dtype: str = "float32", fallback: bool = True):
    """The model's compiled step (kept with it like the eager one). Where it cannot run (another architecture, a model
    off the CPU or not in float32, no C++ compiler): None after one line on stderr, or with fallback=False a
    TinylmError saying why."""
    check_dtype(dtype)
    weight = model.tok_embeddings.weight
    try:
        if getattr(model, "family", None) != "llama":
            raise CompileUnavailable(f"the compiled step is for LLaMA models, not {type(model).__name__}")
        if weight.device.type != "cpu" or weight.dtype != torch.float32:
            raise CompileUnavailable(f"the compiled step runs float32 models on the CPU, not {weight.dtype} on "
                                     f"{weight.device.type}")
        return kept_copy(model, f"compiled-{dtype}", lambda: CompiledLlama(model, dtype)).step
    except CompileUnavailable as error:
        if not fallback:
            raise
        _note_once(str(error))
    return None
