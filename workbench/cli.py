"""The `workbench` command: XTuner's verbs, on a laptop CPU or a GPU.

    workbench list-cfg [-p PATTERN]            shipped recipes
    workbench copy-cfg NAME DIR                copy a recipe to edit
    workbench gen-data OUT --name --owner      identity data set (diverse or the tutorial's)
    workbench check-dataset PATH               validate a data file or a config's data
    workbench log-dataset CONFIG               show encoded samples with the trained part marked
    workbench train CONFIG                     train (lora / qlora / full)
    workbench train CONFIG --launcher accelerate --accelerate-config accelerate_configs/X.yaml [--num-processes N]
                                               the same on several processes / GPUs / machines
    workbench train CONFIG --deepspeed deepspeed_zero2   XTuner's spelling of --accelerate-config deepspeed_zero2
    workbench convert pth_to_hf CONFIG CKPT DIR
    workbench convert merge BASE ADAPTER DIR
    workbench convert gguf MODEL OUT.gguf [--outtype f16|q8_0] [--adapter DIR]   for llama.cpp / Ollama (+ Modelfile)
    workbench chat MODEL [--adapter DIR]       chat in the terminal, or answer scripted prompts
    workbench web MODEL [--compare BASE]       chat in the browser (Streamlit), before/after side by side
    workbench serve MODEL [--adapter DIR]      an OpenAI-compatible API on 127.0.0.1:8000
    workbench analyze WORK_DIR                 overfitting per checkpoint: hit, leak, retention, collapse
    workbench report RUN_OR_ADAPTER_OR_MERGED  a report card (one HTML page and a PNG) to hand in
    workbench grade FOLDER --base BASE         grade every submission in a folder: one sortable table
    workbench compare [RECIPE ...]             train and compare recipes in one table
    workbench run-notebooks [--smoke] [--one-recipe]  execute notebooks 01-07 headless (mixed + tutorial recipe)
    workbench lab [--port 8888]                JupyterLab on the notebooks (what `make lab` runs)
    workbench prepare-model [FOLDER]           prepare the embedded base model (done by make setup), or convert an InternLM2 folder

Known errors (bad config, bad data, missing model, unusable folder or checkpoint)
print one clear message and exit with status 2, without a traceback.

The verbs themselves are in workbench/cli_commands.py; each imports its stage inside its function (heavy: most stages load
torch and transformers), so `workbench --help` and the light commands start at once.
"""
from __future__ import annotations

import argparse
import sys

from workbench.cli_commands import (
    cmd_list_cfg, cmd_copy_cfg, cmd_show_cfg, cmd_gen_data, cmd_check_dataset, cmd_log_dataset, cmd_train,
    cmd_pth_to_hf, cmd_merge, cmd_gguf, cmd_chat, cmd_web, cmd_serve, cmd_analyze, cmd_compare, cmd_run_notebooks,
    cmd_lab, cmd_prepare_model)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args) or 0
    except KNOWN_ERRORS() as e:
        print(f"error{_rank_tag()}: {e}", file=sys.stderr)
        _hint(e)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


def _hint(e: BaseException) -> None:
    """What to do about a refusal a student meets first, in the locale's language (workbench/i18n/)."""
    from workbench.i18n import default_lang, refusal_hint

    hint = refusal_hint(e, default_lang())
    if hint:
        print(hint, file=sys.stderr)


def _rank_tag() -> str:
    """' (process 3 of 4)' in a process started by accelerate launch / torchrun, except the first."""
    import os

    rank, world = os.environ.get("RANK", "0"), os.environ.get("WORLD_SIZE", "1")
    return f" (process {rank} of {world})" if rank not in ("", "0") else ""


def KNOWN_ERRORS() -> tuple[type[BaseException], ...]:
    from workbench.checkpoint import CheckpointError
    from workbench.config import ConfigError
    from workbench.convert import ConvertError
    from workbench.convert_models import ConversionError
    from workbench.models import ModelError
    from workbench.prompt import TemplateError
    from workbench.samples import DataError

    return CheckpointError, ConfigError, ConversionError, ConvertError, DataError, ModelError, TemplateError, FileExistsError, FileNotFoundError


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="workbench", description="Fine-tune a chat LLM into a personal assistant (XTuner's workflow).")
    sub = p.add_subparsers(title="commands", metavar="COMMAND")

    s = sub.add_parser("list-cfg", help="list the shipped recipes", description="List the shipped recipes (configs).")
    s.add_argument("-p", "--pattern", help="only names containing this text (or matching this glob)")
    s.set_defaults(func=cmd_list_cfg)

    s = sub.add_parser("copy-cfg", help="copy a recipe to a folder to edit", description="Write a recipe's full, commented config to DIR/NAME_copy.yaml.")
    s.add_argument("name")
    s.add_argument("save_dir")
    s.set_defaults(func=cmd_copy_cfg)

    s = sub.add_parser("show-cfg", help="print a config with every field", description="Print the full config a file or recipe resolves to.")
    s.add_argument("config")
    s.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE")
    s.set_defaults(func=cmd_show_cfg)

    s = sub.add_parser("gen-data", help="generate an identity data set", description="Generate an identity data set in XTuner's conversation format.")
    s.add_argument("out", help="output file (.json or .jsonl)")
    s.add_argument("--name", default="Nova", help="the assistant's name")
    s.add_argument("--owner", default="Alex", help="the owner's name")
    s.add_argument("--style", choices=("diverse", "tutorial"), default="diverse",
                   help="diverse: many bilingual phrasings; tutorial: the tutorial's two pairs repeated --n-repeat times")
    s.add_argument("--n-repeat", type=int, default=3750, help="tutorial style only: repetitions of the two pairs")
    s.add_argument("--overwrite", action="store_true", help="replace an existing file")
    s.set_defaults(func=cmd_gen_data)

    s = sub.add_parser("check-dataset", help="validate a data file or a config's data",
                       description="Validate a data file or all data of a config: errors name the file, record and field. Changes no file.")
    s.add_argument("path", help="a data file, a config YAML, or a recipe name")
    s.add_argument("--max-length", type=int, default=None, help="report records longer than this (default: the config's, or 512)")
    s.add_argument("--model", default=None, help="tokenizer to count tokens with (default: the config's base model)")
    s.add_argument("--lang", choices=("en", "zh"), default=None, help="the report in this language (default: the system locale's)")
    s.set_defaults(func=cmd_check_dataset)

    s = sub.add_parser("log-dataset", help="show encoded samples with the trained part marked",
                       description="Show how samples are encoded: [[...]] marks the tokens that are trained.")
    s.add_argument("config")
    s.add_argument("-n", type=int, default=3, help="number of samples to show")
    s.set_defaults(func=cmd_log_dataset)

    s = sub.add_parser("train", help="fine-tune (lora, qlora or full)", description="Train as the config says.")
    s.add_argument("config", help="a config YAML or a recipe name")
    s.add_argument("--work-dir", help="where checkpoints and logs go (default: work_dirs/<name>)")
    s.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from the last checkpoint, or from CKPT (an iter_N folder)")
    s.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="override config fields, e.g. lr=1e-4 max_steps=20")
    g = s.add_argument_group("several processes", "re-run this command under `accelerate launch` (NPROC_PER_NODE=N does the same "
                             "with N processes); or start it yourself: accelerate launch --config_file X -m workbench train CONFIG")
    g.add_argument("--launcher", choices=("none", "accelerate"), default=None,
                   help="accelerate: start the processes with accelerate launch; none: this process only (ignores NPROC_PER_NODE)")
    g.add_argument("--accelerate-config", metavar="YAML", help="an accelerate config, e.g. accelerate_configs/ddp_1node.yaml "
                   "(or just ddp_1node); implies --launcher accelerate")
    g.add_argument("--deepspeed", metavar="NAME", help="XTuner's spelling: deepspeed_zero2, deepspeed_zero3, deepspeed_zero2_offload "
                   "or deepspeed_zero3_offload (= --accelerate-config accelerate_configs/NAME.yaml; or a DeepSpeed accelerate "
                   "config file); for CUDA GPUs (without one DeepSpeed runs on the CPUs, slowly); implies --launcher accelerate")
    g.add_argument("--num-processes", type=int, metavar="N", help="processes in all (overrides the config's num_processes; "
                   "default NPROC_PER_NODE); implies --launcher accelerate")
    s.set_defaults(func=cmd_train)

    conv = sub.add_parser("convert", help="pth_to_hf, merge or gguf", description="Convert a checkpoint, merge an adapter, or write a GGUF file.")
    csub = conv.add_subparsers(title="conversions", metavar="KIND")
    s = csub.add_parser("pth_to_hf", help="checkpoint to a Hugging Face adapter", description="Turn a training checkpoint into a standalone HF adapter (or model, for full).")
    s.add_argument("config")
    s.add_argument("checkpoint", help="an iter_N folder")
    s.add_argument("save_dir")
    s.add_argument("--fp32", action="store_true", help="save float32 weights (default float16)")
    s.add_argument("--max-shard-size", default="2GB")
    s.set_defaults(func=cmd_pth_to_hf)
    s = csub.add_parser("merge", help="merge an adapter into its base", description="Merge an adapter into the unquantised base; write a plain model folder.")
    s.add_argument("base", help="base model: 'embedded', a folder or a hub id")
    s.add_argument("adapter")
    s.add_argument("save_dir")
    s.add_argument("--max-shard-size", default="2GB")
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto")
    s.add_argument("--trust-remote-code", action="store_true")
    s.set_defaults(func=cmd_merge)
    s = csub.add_parser("gguf", help="a GGUF file (+ Ollama Modelfile) for llama.cpp, Ollama, LM Studio",
                        description="Write a merged model (or MODEL + --adapter, merged on the fly) as one GGUF file with the "
                        "training chat template and stop tokens, and an Ollama Modelfile beside it. llama and qwen2 models.")
    s.add_argument("model", help="a merged model folder, or the base when --adapter is given ('embedded', a folder)")
    s.add_argument("out", help="the .gguf file to write (must not exist)")
    s.add_argument("--outtype", choices=("f16", "q8_0"), default="f16", help="f16: float16 matrices; q8_0: 8-bit blocks (half the size)")
    s.add_argument("--adapter", help="an adapter folder to merge into MODEL first")
    s.add_argument("--check", action="store_true", help="load the file back with transformers and compare logits, answers and prompt ids")
    s.set_defaults(func=cmd_gguf)

    s = sub.add_parser("chat", help="chat with a model (and adapter)", description="Chat in the terminal (RESET clears history, EXIT quits), or answer --prompt / --prompt-file and exit.")
    _model_arguments(s)
    s.add_argument("--system", help="system prompt (default: the one saved with the adapter or model, else the workbench default)")
    _sampling_arguments(s)
    s.add_argument("--prompt", action="append", default=[], help="answer this prompt and exit (repeatable)")
    s.add_argument("--prompt-file", help="answer each line of this file and exit")
    _device_arguments(s)
    s.add_argument("--lang", choices=("en", "zh"), default=None, help="the chat's banner and notes in this language (answers as generated) (default: the system locale's)")
    s.set_defaults(func=cmd_chat)

    s = sub.add_parser("web", help="chat in the browser (Streamlit), before/after side by side",
                       description="A chat page in the browser: streamed answers, history with a clear button, the system prompt "
                                   "and generation settings in the sidebar; with --compare BASE the base model answers beside it.")
    _model_arguments(s)
    s.add_argument("--compare", metavar="BASE", help="also answer every question with BASE (the model before training), side by side")
    s.add_argument("--system", help="system prompt (default: the one saved with the adapter or model, else the workbench default)")
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    s.add_argument("--port", type=int, default=7860)
    _sampling_arguments(s, " (the sidebar's starting value)")
    _device_arguments(s)
    s.add_argument("--lang", choices=("en", "zh"), default=None,
                   help="the page's language (default: the system locale's: zh for zh_*, else en)")
    s.set_defaults(func=cmd_web)

    s = sub.add_parser("serve", help="serve a model (and adapter) as an OpenAI-compatible API",
                       description="Serve /v1/chat/completions (streamed or not), /v1/models and /health with the training "
                                   "prompt and stop tokens. Concurrent requests are decoded together in one batch. Ctrl-C stops.")
    _model_arguments(s)
    s.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only; 0.0.0.0 opens it to the network)")
    s.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 = any free port, printed at start)")
    s.add_argument("--model-name", help="the model's name in the API (default: the adapter's or model's folder name)")
    s.add_argument("--system", help="system prompt for requests without one (default: the one saved with the adapter or model)")
    s.add_argument("--max-batch", type=int, default=8, help="requests decoded together at most; more wait in a queue")
    s.add_argument("--threads", type=int, help="CPU threads for torch (default: torch's, one per core)")
    _device_arguments(s)
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("analyze", help="measure overfitting of a run, checkpoint by checkpoint",
                       description="Identity hit rate (seen/unseen), leak rate, retention and collapse for the base model and each checkpoint.")
    s.add_argument("work_dir")
    s.add_argument("--probes", help="a probe YAML (default: workbench/probes/default.yaml)")
    s.add_argument("--max-new-tokens", type=int, default=40)
    s.add_argument("--lang", choices=("en", "zh"), default=None,
                   help="the table, plot and diagnosis in this language (default: the system locale's)")
    s.set_defaults(func=cmd_analyze)

    from workbench.report.commands import add_parsers  # light: the commands import their stages when run

    add_parsers(sub)

    s = sub.add_parser("compare", help="train and compare recipes (tutorial vs mixed)",
                       description="Train (or reuse) each recipe on the same base model, analyze it, and write one comparison table and plot.")
    s.add_argument("recipes", nargs="*", help="recipes or config files (default: the tutorial's and the mixed recipe, DEFAULT_RECIPES in workbench/comparison.py)")
    s.add_argument("--out", default="outputs/compare")
    s.add_argument("--cfg-options", nargs="+", default=[], metavar="KEY=VALUE", help="applied to every recipe")
    s.add_argument("--lang", choices=("en", "zh"), default=None, help="the printed table and lines in this language (the files written stay English) (default: the system locale's)")
    s.set_defaults(func=cmd_compare)

    s = sub.add_parser("run-notebooks", help="execute notebooks 01-07 headless (papermill)",
                       description="Execute the notebook series in order; executed copies and figures go to an output folder.")
    s.add_argument("--out", help="output folder (default: outputs/notebooks-<time>)")
    s.add_argument("--smoke", action="store_true", help="tiny random model and a handful of steps")
    s.add_argument("--recipe", help="the main recipe notebook 02 configures (default: the mixed recipe)")
    s.add_argument("--baseline-recipe", metavar="RECIPE", help="the recipe trained beside it (default: the tutorial's)")
    s.add_argument("--one-recipe", action="store_true", help="train only the main recipe (no baseline)")
    s.add_argument("--lang", choices=("en", "zh"), default=None,
                   help="every notebook's `lang` parameter: what the notebooks print and draw (default: en)")
    s.set_defaults(func=cmd_run_notebooks)

    s = sub.add_parser("lab", help="JupyterLab on the notebooks (what `make lab` runs)",
                       description="Start JupyterLab from this Python on notebooks/, bound to 127.0.0.1 (the link with its "
                       "token is printed), its kernels over Unix sockets in Jupyter's runtime folder where they can be.")
    s.add_argument("--port", type=int, default=8888)
    s.add_argument("--ip", default="127.0.0.1", help="the address to bind (0.0.0.0: every interface, reachable by others)")
    s.set_defaults(func=cmd_lab)

    s = sub.add_parser("prepare-model", help="prepare the embedded base model, or convert a remote-code folder (InternLM2)",
                       description="Without FOLDER: convert the embedded GGUF model into a Hugging Face folder (once), "
                       "and register it in the Hugging Face hub cache ($HF_HUB_CACHE, $HF_HOME/hub or ~/.cache/huggingface/hub) as HuggingFaceTB/SmolLM2-135M-Instruct. "
                       "With FOLDER (a hub-layout InternLM2 / InternLM2.5 folder): convert it once into a standard Llama folder in the "
                       "workbench's cache, checked against the original weights and tokenizer (training does this on first load too).")
    s.add_argument("folder", nargs="?", help="a model folder that needs remote code, e.g. ./models/internlm2-chat-1_8b")
    s.add_argument("--force", action="store_true", help="convert again even if ready")
    s.set_defaults(func=cmd_prepare_model)
    return p


def _model_arguments(s: argparse.ArgumentParser) -> None:
    """MODEL and --adapter: what chat, web and serve load."""
    s.add_argument("model", help="'embedded', a model folder (base or merged) or a hub id")
    s.add_argument("--adapter", help="an adapter folder to apply")


def _sampling_arguments(s: argparse.ArgumentParser, note: str = "") -> None:
    """The generation settings of chat and web (`note`: what the values are, on the web page)."""
    s.add_argument("--max-new-tokens", type=int, default=256, help=note.strip(" ()") or None)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy" + note)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--repetition-penalty", type=float, default=1.0)


def _device_arguments(s: argparse.ArgumentParser) -> None:
    s.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    s.add_argument("--trust-remote-code", action="store_true")


# ---------------------------------------------------------------------------
# Commands
# ---------------------------------------------------------------------------

if __name__ == "__main__":
    sys.exit(main())
