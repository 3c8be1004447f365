"""Messages of the notebooks' outputs: the dataset report, the estimate, training's, convert's and merge's printed
lines, the merge and GGUF checks' keys, the before/after table. key -> (English, Chinese), as in workbench/i18n."""

MESSAGES: dict[str, tuple[str, str]] = {
    # --- the dataset report (encoding.DatasetReport: notebook 01, training, workbench check-dataset) ---
    "ds.records": ("records: {n} read, {kept} kept for training, {dropped} dropped",
                   "记录：读取 {n} 条，保留 {kept} 条用于训练，丢弃 {dropped} 条"),
    "ds.tokens": ("tokens: {n:,} in all, {trained:,} trained ({share:.0f}%)",
                  "token：共 {n:,} 个，其中 {trained:,} 个参与训练（{share:.0f}%）"),
    "ds.longest": ("longest sample: {n} tokens{limit}", "最长的样本：{n} 个 token{limit}"),
    "ds.limit": (" (max_length {n})", "（max_length {n}）"),
    "ds.truncated": ("truncated: {n} samples were longer than max_length and were cut",
                     "截断：{n} 个样本超过 max_length，已被截断"),
    "ds.dropped": ("dropped: {n} samples had nothing left to train after truncation, e.g. {where}",
                   "丢弃：{n} 个样本截断后没有可训练的内容，例如 {where}"),
    "ds.per_source": ("per source: {parts}", "按来源：{parts}"),
    "ds.none": ("none", "无"),
    "ds.files": ("files: {n} read ({parts})", "文件：读取 {n} 个（{parts}）"),
    "ds.n_files": ("{source}: {n} files", "{source}：{n} 个文件"),
    "ds.skipped_one": ("; {n} file of other types skipped, e.g. {first}", "；跳过 {n} 个其他类型的文件，例如 {first}"),
    "ds.skipped": ("; {n} files of other types skipped, e.g. {first}", "；跳过 {n} 个其他类型的文件，例如 {first}"),
    "ds.columns": ("columns: {note} in {where}", "列：{note}，见 {where}"),
    "ds.files_eg": ("{n} files, e.g. {first}", "{n} 个文件，例如 {first}"),
    "ds.errors_none": ("errors: none", "错误：无"),
    "ds.errors": ("errors: {n}", "错误：{n} 个"),
    "ds.more": ("  ... and {n} more", "  ……还有 {n} 个"),
    # --- notebook 01 ---
    "nb.records_in": ("{n} records in {path}", "{path} 中有 {n} 条记录"),
    "nb.converted": ("{n} records converted to {path}", "{n} 条记录已转换并写入 {path}"),
    # --- the estimate (notebook 02) ---
    "est.what": ("what", "项目"),
    "est.estimate": ("estimate", "估计"),
    "est.params": ("parameters (total / trained)", "参数量（总计 / 训练的）"),
    "est.weights": ("base weights", "基座模型权重"),
    "est.optimizer": ("gradients + AdamW state", "梯度 + AdamW 状态"),
    "est.activations": ("activations + logits (one micro-batch; QLoRA on a CPU: + its dequantized weights)",
                        "激活值 + logits（一个微批次；CPU 上的 QLoRA 还要加上反量化的权重）"),
    "est.runtime": ("the process itself (Python, torch)", "进程本身（Python、torch）"),
    "est.memory": ("memory needed, about", "需要的内存，约"),
    "est.tokens": ("tokens per step", "每步 token 数"),
    "est.steps": ("steps", "步数"),
    "est.gflops": ("measured matmul throughput ({device})", "实测矩阵乘法吞吐（{device}）"),
    "est.step_time": ("time per step, about", "每步时间，约"),
    "est.total_time": ("training time, about", "训练时间，约"),
    # --- configure (notebook 02) ---
    "cfg.halved": ("configure: {name} {old} -> {new} (half of max_steps={steps}; pass {name}= to choose)",
                   "configure：{name} {old} -> {new}（max_steps={steps} 的一半；传入 {name}= 可以自己指定）"),
    "cfg.datasets": ("configure: datasets: {path} ({shown}) replaces {replaced}; {kept} other source(s) kept",
                     "configure：数据集 {path}（{shown}）替换了 {replaced}；保留其他 {kept} 个数据来源"),
    "cmp.no_baseline_recipe": ("no baseline recipe: the series trains only the main recipe",
                               "没有对照配方：这一系列只训练主配方"),
    "cmp.no_baseline": ("no baseline configured in {folder} (notebook 02's baseline_recipe is empty)",
                        "{folder} 中没有配置对照（笔记本 02 的 baseline_recipe 为空）"),
    "cmp.baseline_done": ("baseline {name}: {steps} steps in {seconds:.0f} s", "对照 {name}：{steps} 步，用时 {seconds:.0f} 秒"),
    "cmp.trained": ("{name}: trained in {seconds:.0f} s", "{name}：训练用时 {seconds:.0f} 秒"),
    "cmp.no_run": ("{work}: no run there, skipped", "{work}：这里没有训练结果，跳过"),
    # --- training (notebook 03, workbench train) ---
    "train.work_dir": ("work dir: {work}\n  config.yaml, metrics.jsonl, eval_log.jsonl, iter_N/ checkpoints, adapter/ at the end",
                       "工作目录：{work}\n  config.yaml、metrics.jsonl、eval_log.jsonl、iter_N/ 检查点，最后是 adapter/"),
    "train.done": ("done. checkpoints: {work}/iter_*  final adapter: {adapter}",
                   "完成。检查点：{work}/iter_*  最终的适配器：{adapter}"),
    "train.eval": ("[eval @ step {step}]", "[评估 @ 第 {step} 步]"),
    "train.qa": ("  Q: {question}\n  A: {answer}", "  问：{question}\n  答：{answer}"),
    "train.gpu": ("GPU fast path: {what}, micro-batches of up to {budget} tokens{sized}{note}",
                  "GPU 快速路径：{what}，每个 micro-batch 最多 {budget} 个 token{sized}{note}"),
    "train.gpu_sized": (" (sized from free GPU memory)", "（按 GPU 的空闲显存确定）"),
    "train.gpu_checkpointing": ("; gradient checkpointing switched on: one row of max_length does not fit without it",
                                "；已开启梯度检查点：不开它连一行 max_length 都放不下"),
    "train.packing_off": ("packing off: {model} runs its own (remote) attention code, which would let packed "
                          "conversations attend to each other; training one conversation a row",
                          "已关闭 packing：{model} 使用它自己的（远程）注意力代码，拼在一行里的对话会互相看到；"
                          "改为每行只训练一段对话"),
    "train.fsdp_fallback": ("note: the accelerate config asks for FSDP, but without a GPU accelerate runs {strategy} "
                            "(gloo); the weights are not sharded.",
                            "注意：accelerate 配置要求 FSDP，但没有 GPU 时 accelerate 运行的是 {strategy}（gloo），"
                            "权重没有被切分。"),
    # --- convert and merge (notebooks 04, 05) ---
    "conv.wrote": ("wrote {out} from {ckpt}", "已从 {ckpt} 写出 {out}"),
    "conv.qlora": ("the adapter was trained on a 4-bit (QLoRA) base; merging it into the unquantised base, reloaded in "
                   "full precision", "这个适配器是在 4 位（QLoRA）基座上训练的；现在把它合并进以全精度重新加载的未量化基座"),
    "conv.merged": ("merged model written to {folder}", "合并后的模型已写入 {folder}"),
    "gguf.written": ("{outtype}: {mb:.1f} MB in {seconds:.1f} s", "{outtype}：{mb:.1f} MB，用时 {seconds:.1f} 秒"),
    # --- the before/after table (notebook 06, workbench compare) ---
    "model.base": ("base", "基础模型"),
    "model.baseline": ("baseline: {name}", "对照：{name}"),
    "model.tuned": ("fine-tuned: {name}", "微调后：{name}"),
    "cmp.answering": ("answering", "回答中"),
    "col.prompt": ("prompt", "问题"),
    "col.question": ("question", "问题"),
    "col.step": ("step", "步数"),
    "analysis.progress": ("analyzing {name}", "正在分析 {name}"),
    "ds.pretraining_text": ("(pre-training text)", "（预训练文本）"),
}

# The keys of the checks' result dicts (convert.verify_merge, gguf_export.verify_gguf) -> Chinese (`localize_keys`).
KEYS: dict[str, str] = {
    "question": "问题", "max |logit difference|": "最大 |logit 差|", "base + adapter answers": "基座 + 适配器的回答",
    "merged answers": "合并后模型的回答", "same answer": "回答相同",
    "outtype": "权重格式", "max |logit difference| vs merged": "与合并后模型的最大 |logit 差|",
    "max |logit difference| vs merged with the GGUF's rounding": "与按 GGUF 取整后的合并模型的最大 |logit 差|",
    "same greedy answers": "贪心解码的回答相同", "answers (merged, gguf)": "回答（合并后模型，GGUF）",
    "template gives the training prompt ids": "模板给出与训练时相同的提示 token",
}

# The shipped recipes' descriptions in Chinese (notebook 02's table); the English is each YAML's `description`.
RECIPES_ZH: dict[str, str] = {
    "internlm2_chat_1_8b_qlora_identity_gpu": "在本地的 internlm2-chat-1_8b 文件夹上做 QLoRA，GPU，身份数据（训练营的作业）",
    "qwen2_5_1_5b_instruct_lora_identity_gpu": "在本地的 Qwen2.5-1.5B-Instruct 文件夹上做 LoRA，GPU，身份数据",
    "smollm2_135m_full_identity_cpu": "内置 SmolLM2-135M 的全参数微调，身份数据（短训练）",
    "smollm2_135m_lora_identity_cpu": "内置 SmolLM2-135M 上的 LoRA，多样的中英文身份数据，CPU，几分钟",
    "smollm2_135m_lora_identity_mixed_cpu": "治过拟合的配方：多样的身份数据 + 日常对话 + 向基础模型蒸馏；学会自己是谁，其余保持不变（make run 训练的就是它）",
    "smollm2_135m_lora_identity_tutorial": "教程的配方：两条身份问答反复重复，用来复现和观察过拟合",
    "smollm2_135m_qlora_identity_cpu": "内置 SmolLM2-135M 上的 QLoRA（4-bit NF4 基座），身份数据",
    "smollm2_135m_tiny_smoke": "冒烟测试：微型随机模型，6 步，几秒钟（测试、CI、笔记本的冒烟模式）",
}
