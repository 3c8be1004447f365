"""The `workbench` command's verbs: each reads its arguments, calls its stage and prints the result.

The parser and the error handling are in workbench/cli.py. Each command imports its
stage inside its function (heavy: most stages load torch and transformers), so
`workbench --help` and the light commands start at once.
"""
from __future__ import annotations

import sys
from pathlib import Path

def cmd_list_cfg(args) -> int:
    from workbench.config import list_recipes

    rows = list_recipes(args.pattern)
    if not rows:
        print(f"no recipe matches {args.pattern!r}")
        return 1
    width = max(len(n) for n, _ in rows)
    print("=" * 80 + "\nrecipes (copy one with `workbench copy-cfg NAME .`)\n" + "-" * 80)
    for name, desc in rows:
        print(f"{name:<{width}}  {desc}")
    print("=" * 80)
    return 0


def cmd_copy_cfg(args) -> int:
    from workbench.config import copy_recipe

    Path(args.save_dir).mkdir(parents=True, exist_ok=True)
    print(f"copied to {copy_recipe(args.name, args.save_dir)}")
    return 0


def cmd_show_cfg(args) -> int:
    from workbench.config import config_to_yaml, resolve_config

    print(config_to_yaml(resolve_config(args.config, args.cfg_options)), end="")
    return 0


def cmd_gen_data(args) -> int:
    from workbench.identity import write_identity_dataset

    path = write_identity_dataset(args.out, args.name, args.owner, style=args.style, n_repeat=args.n_repeat, overwrite=args.overwrite)
    print(f"wrote {path}")
    return 0


def cmd_check_dataset(args) -> int:
    from workbench.encoding import check_dataset
    from workbench.i18n import default_lang

    # A name, not a loaded tokenizer: check_dataset then also reads the model's vocabulary size.
    report = check_dataset(args.path, tokenizer=args.model, max_length=args.max_length, strict=False)
    print(report.text(args.lang or default_lang()))
    return 1 if report.errors else 0


def cmd_log_dataset(args) -> int:
    from workbench.config import resolve_config
    from workbench.display import show_sample
    from workbench.encoding import encode_samples
    from workbench.mixing import mix_sources
    from workbench.models import load_builder

    cfg = resolve_config(args.config)
    builder = load_builder(cfg)
    encoded, report = encode_samples(mix_sources(cfg)[: args.n], builder, cfg.max_length, cfg.loss_on)
    for i, enc in enumerate(encoded):
        print(f"--- sample {i + 1}: {len(enc)} tokens, {enc.n_trained} trained ([[...]])" + (" TRUNCATED" if enc.truncated else ""))
        print(show_sample(builder, enc))
    return 0


def cmd_train(args) -> int:
    from workbench.config import resolve_config
    from workbench.launch import launch, wants_launcher
    from workbench.train import train

    cfg = resolve_config(args.config, args.cfg_options)
    if wants_launcher(args):
        return launch(args, cfg)
    train(cfg, work_dir=args.work_dir, resume=args.resume)
    return 0


def cmd_pth_to_hf(args) -> int:
    from workbench.convert import pth_to_hf

    pth_to_hf(args.config, args.checkpoint, args.save_dir, fp32=args.fp32, max_shard_size=args.max_shard_size)
    return 0


def cmd_merge(args) -> int:
    from workbench.convert import merge

    merge(args.base, args.adapter, args.save_dir, max_shard_size=args.max_shard_size, device=args.device,
          torch_dtype=args.dtype, trust_remote_code=args.trust_remote_code)
    return 0


def cmd_gguf(args) -> int:
    from workbench.gguf_export import export_gguf, verify_gguf

    r = export_gguf(args.model, args.out, outtype=args.outtype, adapter=args.adapter)
    print(f"wrote {r.path} ({r.size_bytes / 1e6:.1f} MB, {r.n_tensors} tensors, {r.outtype}) in {r.seconds:.1f} s and {r.modelfile}")
    if args.check:
        for k, v in verify_gguf(r.path, args.model, adapter=args.adapter).items():
            print(f"{k}: {v}")
    return 0


def cmd_chat(args) -> int:
    from workbench.chat import GenerationSettings, answer, chat_loop, load_chat_model
    from workbench.i18n import default_lang, set_lang

    lang = args.lang or default_lang()
    set_lang(lang)
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    model, builder = load_chat_model(args.model, args.adapter, device=args.device, system=args.system,
                                     trust_remote_code=args.trust_remote_code)
    prompts = list(args.prompt)
    if args.prompt_file:
        prompts += [line.strip() for line in Path(args.prompt_file).read_text(encoding="utf-8").splitlines() if line.strip()]
    if prompts:
        for q in prompts:
            print(f">>> {q}")
            answer(model, builder, q, settings=settings, on_text=lambda t: print(t, end="", flush=True))
            print()
        return 0
    chat_loop(model, builder, settings, lang=lang)
    return 0


def cmd_web(args) -> int:
    from workbench.chat import GenerationSettings
    from workbench.web import load_app, port_problem, serve

    problem = port_problem(args.host, args.port)  # before minutes of loading
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    settings = GenerationSettings(args.max_new_tokens, args.temperature, args.top_p, args.repetition_penalty)
    app = load_app(args.model, args.adapter, compare=args.compare, system=args.system, settings=settings,
                   device=args.device, trust_remote_code=args.trust_remote_code, lang=args.lang)
    serve(app, args.host, args.port)
    return 0


def cmd_serve(args) -> int:
    from workbench.serve import ServeError, serve

    try:
        serve(args.model, args.adapter, host=args.host, port=args.port, model_name=args.model_name, system=args.system,
              device=args.device, max_batch=args.max_batch, threads=args.threads, trust_remote_code=args.trust_remote_code)
    except ServeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_analyze(args) -> int:
    from workbench.analysis import analysis_file, analyze_run, diagnosis_in, load_probes
    from workbench.display import metrics_table, plot_run
    from workbench.i18n import default_lang

    lang = args.lang or default_lang()
    probes = load_probes(args.probes)
    run = analyze_run(args.work_dir, probes, max_new_tokens=args.max_new_tokens)
    print(metrics_table(run, lang).to_string(index=False))
    saved = analysis_file(args.work_dir, probes)
    plot_run(run, saved.with_suffix(".png"), lang=lang)
    print(f"\n{diagnosis_in(run, lang)}\n\nwritten: {saved}, {saved.with_suffix('.png')}")
    return 0


def cmd_compare(args) -> int:
    from workbench.comparison import compare_recipes
    from workbench.i18n import default_lang, localize_columns, set_lang, t

    lang = args.lang or default_lang()
    set_lang(lang)  # training's printed lines too
    table, _ = compare_recipes(args.recipes or None, args.out, args.cfg_options)
    table["recipe"] = table["recipe"].replace(t("table.base_model", "en"), t("table.base_model", lang))
    print(localize_columns(table, lang).to_string(index=False))
    print(t("compare.written", lang, out=args.out))
    return 0


def cmd_run_notebooks(args) -> int:
    from workbench.notebooks import run_series

    config = {k: v for k, v in (("recipe", args.recipe), ("baseline_recipe", args.baseline_recipe)) if v is not None}
    if args.one_recipe:
        config["baseline_recipe"] = ""
    run_series(args.out, smoke=args.smoke, overrides={"02_config": config} if config else None, lang=args.lang)
    return 0


def cmd_lab(args) -> int:
    from workbench.notebooks import lab

    return lab(args.port, args.ip)


def cmd_prepare_model(args) -> int:
    from workbench.hubcache import EMBEDDED_HUB_ID, register_snapshot
    from workbench.models import ModelError, prepare_embedded_model, prepare_remote_code_folder

    if args.folder:
        source = Path(args.folder)
        if not (source / "config.json").exists():
            raise ModelError(f"{source} is not a model folder (no config.json)")
        converted = prepare_remote_code_folder(source.resolve(), force=args.force)
        print(f"ready: {converted}" if converted != source.resolve() else f"{source} loads as it is: nothing to convert")
        return 0
    folder = prepare_embedded_model(force=args.force)
    # Exports name their base by its public id; plain transformers/peft find it here (HF_HUB_OFFLINE=1).
    print(f"registered as {EMBEDDED_HUB_ID} in the Hugging Face cache: {register_snapshot(folder, EMBEDDED_HUB_ID)}")
    return 0
