"""Report cards and grading: what a student hands in and what a teacher collects.

- `subject`: evaluate a run (work dir), an adapter or a merged model on the held-out probes;
- `card`: one self-contained HTML page (images inlined) plus a PNG, per subject;
- `grade`: every submission in a folder, one sortable table (CSV and HTML) linking each card.
"""
