"""Messages of the report card (workbench/report/card.py: `workbench report`, `workbench grade`, notebook 07).
key -> (English, Chinese), as in workbench/i18n. The model's answers are never translated."""

MESSAGES: dict[str, tuple[str, str]] = {
    "card.t_unseen": ("unseen identity {probe} >= {target}", "没见过的身份问题 {probe} >= {target}"),
    "card.t_roles": ("roles right (no owner/assistant mix-up)", "角色正确（没有把主人和助手弄混）"),
    "card.mixups": ("{n} mix-ups", "弄混 {n} 次"),
    "card.t_leak": ("leak {probe} = 0", "泄漏 {probe} = 0"),
    "card.t_strict": ("strict retention EN >= {target}", "严格保持率 EN >= {target}"),
    "card.t_facts": ("no short-answer fact lost", "没有丢失短答案事实"),
    "card.count_interval": (" ({k} of {n}; 95% interval {lo}-{hi})", "（{n} 个中 {k} 个；95% 区间 {lo}-{hi}）"),
    "card.near": (" Within the probes' noise: {which} (the 95% interval of the rate reaches the target; more probes "
                  "or another seed would be needed to tell).",
                  "在探测问题的噪声范围内：{which}（该比率的 95% 区间达到目标；需要更多探测问题或换一个随机种子才能判断）。"),
    "grade.interval": ("95% interval {lo}-{hi}", "95% 区间 {lo}-{hi}"),
    "grade.count": (" ({k}/{n})", "（{k}/{n}）"),  # the grade table's narrow cells: the count as a fraction
    "card.lost_of": ("{lost} of {known} lost", "{known} 个中丢失 {lost} 个"),
    "card.meets_all": ("Meets all {n} targets.", "达到全部 {n} 个目标。"),
    "card.misses": ("Misses {missed} of {n} targets: {which}.", "{n} 个目标中有 {missed} 个没达到：{which}。"),
    "card.keep": (" Keep: {label}", "保留：{label}"),
    "card.no_better": (" (no checkpoint beats the base model)", "（没有检查点胜过基础模型）"),
    "card.end": (".", "。"),
    "card.f_unstated": ("identity not stated (unseen question)", "没有说出身份（没见过的问题）"),
    "card.f_roles": ("roles mixed up", "角色弄混"),
    "card.f_leak": ("identity leaked into an everyday answer", "身份泄漏到日常回答中"),
    "card.f_drift": ("first sentence drifted (token-F1 < {f1})", "首句偏离（token-F1 < {f1}）"),
    "card.f_fact": ("fact lost (the base model was right)", "丢失事实（基础模型答对了）"),
    "card.fig_title": ("{who}: {label}", "{who}：{label}"),
    "card.pass": ("PASS", "达到"),
    "card.miss": ("MISS", "未达到"),
    "card.m_unseen": ("identity unseen", "身份 没见过"),
    "card.m_seen": ("identity seen", "身份 见过"),
    "card.m_no_leak": ("no leak", "无泄漏"),
    "card.m_strict": ("strict retention", "严格保持率"),
    "card.m_similarity": ("similarity", "相似度"),
    "card.m_retention": ("retention (NLL)", "保持率（NLL）"),
    "card.base_model": ("base model", "基础模型"),
    "card.bars_title": ("before (grey) and after (blue); higher is better", "训练前（灰）和训练后（蓝）；越高越好"),
    "card.met": ("met", "达到"),
    "card.missed": ("missed", "未达到"),
    "card.none": ("none", "无"),
    "card.question": ("question", "问题"),
    "card.title": ("Report card: {who}", "成绩单：{who}"),
    "card.who": ("{name}, {owner}'s assistant", "{name}，{owner} 的助手"),
    "card.who_owner": ("{owner}'s assistant (no name of its own)", "{owner} 的助手（没有自己的名字）"),
    "card.subject": ("Subject: <code>{path}</code> ({kind}; recipe {recipe}; base model <code>{base}</code>). Probes: "
                     "held-out questions the model never saw in training.",
                     "评估对象：<code>{path}</code>（{kind}；配方 {recipe}；基础模型 <code>{base}</code>）。"
                     "探测问题：模型在训练中从未见过的留出问题。"),
    "card.targets": ("Targets", "目标"),
    "card.target": ("target", "目标"),
    "card.measured": ("measured", "实测"),
    "card.every_measure": ("Every measure, per model", "每个模型的全部指标"),
    "card.diagnosis": ("Diagnosis", "诊断"),
    "card.examples": ("Before and after, for each kind of failure", "每类失败的训练前后对比"),
    "card.footnote": ("Strict retention: the first sentence of the tuned answer against the base model's\n(token-F1 &ge; {f1}; "
                      "words for English, characters for Chinese). A fact counts only when the base model's answer\n"
                      "contains it.",
                      "严格保持率：微调后回答的首句与基础模型回答的首句比较（token-F1 &ge; {f1}；英文按词，中文按字）。"
                      "只有基础模型的回答包含某个事实时，这个事实才计入。"),
    "card.written": ("report card: {page}\nimage: {png}", "成绩单：{page}\n图片：{png}"),
    "grade.title": ("Grades: {folder}", "成绩表：{folder}"),
    "grade.summary": ("{n} submissions; click a column header to sort.", "共 {n} 份作业；点击列标题可排序。"),
    "grade.sort": ("click to sort", "点击排序"),
    "grade.card_link": ("report card", "成绩单"),
    "grade.progress": ("grading", "评分中"),
    "grade.ok": ("ok", "完成"),
    "grade.line_met": (", {met} targets met", "，达到的目标 {met}"),
    "grade.written": ("written: {page} (and grades.csv, cards/)", "已写出：{page}（以及 grades.csv、cards/）"),
    "grade.missing": ("missing: listed in {roster}, no such submission in {folder}",
                      "缺交：{roster} 里有这名学生，{folder} 里没有这份作业"),
    "grade.error": ("error: {error}", "出错：{error}"),  # a folder's SubjectError in the page's language, others as raised
    "grade.kind_run": ("run", "训练目录"),
    "grade.kind_adapter": ("adapter", "适配器"),
    "grade.kind_merged": ("merged", "合并后的模型"),
    # Why a folder cannot be graded (report/subject.py's SubjectError): the grade page's status in its language
    "subject.not_folder": ("{path}: not a folder (a run's work dir, an adapter or a merged model folder is expected)",
                           "{path}：不是文件夹（应当是训练目录、适配器或合并后的模型的文件夹）"),
    "subject.xtuner_work_dir": ("{path}: an XTuner work dir (its .pth checkpoints are pickles, which the workbench never "
                                "reads): hand in the adapter instead: `xtuner convert pth_to_hf CONFIG PTH OUT "
                                "--safe-serialization`",
                                "{path}：这是 XTuner 的训练目录（其中的 .pth 检查点是 pickle，workbench 从不读取）：请改交"
                                "适配器：`xtuner convert pth_to_hf CONFIG PTH OUT --safe-serialization`"),
    "subject.unknown_folder": ("{path}: neither a run (config.yaml and iter_* checkpoints), an adapter "
                               "(adapter_config.json) nor a merged model (config.json); it holds {names}",
                               "{path}：既不是训练目录（config.yaml 和 iter_* 检查点），也不是适配器（adapter_config.json）"
                               "或合并后的模型（config.json）；里面有 {names}"),
    "subject.empty_folder": ("{path}: an empty folder (a run's work dir, an adapter or a merged model folder is expected)",
                             "{path}：空文件夹（应当是训练目录、适配器或合并后的模型的文件夹）"),
    "subject.no_owner": ("{path}: no {config} (not exported by workbench: XTuner's pth_to_hf or merge, or peft's own "
                         "save), so whose assistant it is is unknown: give the owner's name (--owner NAME, and --name "
                         "NAME if the assistant has a name of its own), or a roster (grade --roster FILE)",
                         "{path}：没有 {config}（不是 workbench 导出的：XTuner 的 pth_to_hf 或 merge，或 peft 自己保存的），"
                         "所以不知道它是谁的助手：请给出主人的名字（--owner NAME；助手有自己的名字时再加 --name NAME），"
                         "或者给一份名单（grade --roster FILE）"),
    "subject.no_base": ("{path}: no {config} and no base model named: give it with --base",
                        "{path}：没有 {config}，也没有指定基础模型：请用 --base 给出"),
    "subject.pickled_adapter": ("{path}: a pickle file, which can run code when loaded, so the workbench does not read "
                                "it; save the adapter as safetensors (XTuner: `xtuner convert pth_to_hf ... "
                                "--safe-serialization`; peft: `save_pretrained(..., safe_serialization=True)`)",
                                "{path}：这是 pickle 文件，加载时可能执行其中的代码，所以工作台不读取它；请把适配器保存为 "
                                "safetensors（XTuner：`xtuner convert pth_to_hf ... --safe-serialization`；peft："
                                "`save_pretrained(..., safe_serialization=True)`）"),
    "subject.cannot_load_run": ("{path}: cannot be read as a training run ({detail})",
                                "{path}：无法作为训练运行读取（{detail}）"),
    "subject.cannot_load_adapter": ("{path}: cannot be loaded as an adapter ({detail})",
                                    "{path}：无法作为适配器加载（{detail}）"),
    "subject.cannot_load_merged": ("{path}: cannot be loaded as a merged model ({detail})",
                                   "{path}：无法作为合并后的模型加载（{detail}）"),
}

# The grade table's column headers in Chinese (grades.html; grades.csv keeps the English column names).
GRADE_COLUMNS_ZH: dict[str, str] = {
    "submission": "作业", "status": "状态", "kind": "类型", "assistant": "助手", "owner": "主人", "kept": "保留的检查点",
    "hit unseen EN": "没见过的身份问题 EN", "hit unseen ZH": "没见过的身份问题 ZH", "role mix-ups": "角色弄混",
    "leak EN": "泄漏 EN", "leak ZH": "泄漏 ZH", "strict EN": "严格保持率 EN", "strict ZH": "严格保持率 ZH",
    "similarity": "相似度", "facts lost": "丢失的事实", "targets met": "达到的目标", "verdict": "结论", "card": "成绩单",
}
