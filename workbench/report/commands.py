"""`workbench report` and `workbench grade`: their argument parsers and commands (kept out of cli.py's length).

Like every command of `workbench.cli`, each imports its stage inside its function.
"""
from __future__ import annotations

from pathlib import Path


def add_parsers(sub) -> None:
    """Register `report` and `grade` on the CLI's subparsers."""
    for name, what, helps in (
            ("report", "path", ("a report card of a run, adapter or merged model (HTML + PNG)",
                                "Evaluate a run (work dir), an adapter or a merged model on the held-out probes; write one self-contained HTML "
                                "page and its PNG (default PATH/report_card.html, or report_card.NAME.html with --probes NAME.yaml): "
                                "identity, leak, retention (strict and similarity), facts, before/after examples, the verdict and the "
                                "checkpoint to keep.")),
            ("grade", "folder", ("grade a folder of submissions (adapters, merged models, runs)",
                                 "Run the same probes on every submission in a folder; write grades.csv, a sortable grades.html and a report "
                                 "card each (default FOLDER/_grades). A broken submission gets a row saying why.")),
    ):
        s = sub.add_parser(name, help=helps[0], description=helps[1])
        s.add_argument(what)
        s.add_argument("--base", help="the base model (default: the one named in each artifact's saved config)")
        s.add_argument("--out", help="the HTML file (report) or folder (grade) to write")
        s.add_argument("--probes", help="a probe YAML (default: workbench/probes/default.yaml)")
        s.add_argument("--max-new-tokens", type=int, default=40)
        s.add_argument("--lang", choices=("en", "zh"), help="the card's language (default: the system locale's)")
        s.add_argument("--owner", help="whose assistant an adapter or merged model is, for homework exported by another "
                                       "tool (XTuner), which carries no names; overrides the saved config's")
        s.add_argument("--name", help="the assistant's own name (default for such homework: none, as in the camp's "
                                      "'我是{owner}的小助手'); overrides the saved config's")
        s.add_argument("--system", help="the system prompt to ask with (default: the one saved with the model; none "
                                        "for homework exported by another tool, as XTuner trains)")
        if name == "grade":
            s.add_argument("--roster", help="a CSV with the columns submission, owner (and optionally assistant): each "
                                            "student's names; students without a submission get a row too")
        s.set_defaults(func=cmd_report if name == "report" else cmd_grade)


def _given(args):
    from workbench.report.subject import Given

    return Given(assistant_name=args.name, owner_name=args.owner, system=args.system)


def cmd_report(args) -> None:
    from workbench.analysis import load_probes
    from workbench.i18n import default_lang, t
    from workbench.report.card import report_card

    lang = args.lang or default_lang()
    page, png = report_card(args.path, args.base, args.out, load_probes(args.probes), args.max_new_tokens, lang=lang,
                            given=_given(args))
    print(t("card.written", lang, page=page, png=png))


def cmd_grade(args) -> None:
    from workbench.analysis import load_probes
    from workbench.i18n import default_lang, t
    from workbench.report.grade import grade_folder

    lang = args.lang or default_lang()
    table = grade_folder(args.folder, args.base, args.out, load_probes(args.probes), args.max_new_tokens,
                         lang=lang, given=_given(args), roster=args.roster)
    for row in table.to_dict("records"):  # one line each: a broken submission's status says what to do, in full
        met = t("grade.line_met", lang, met=row["targets met"]) if row["targets met"] else ""
        print(f"{row['submission']}: {row['status']}{met}")
    print("\n" + t("grade.written", lang, page=Path(args.out or Path(args.folder) / "_grades") / "grades.html"))
