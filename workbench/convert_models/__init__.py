"""Remote-code model folders converted once into standard transformers folders.

- `internlm2`: detect a hub-layout InternLM2 / InternLM2.5 folder and convert it into a Llama
  folder (weights, config, provenance), cached by the source folder's content;
- `spm_tokenizer`: a sentencepiece `tokenizer.model` (with the hub's renamed chat tokens) as a
  fast `tokenizer.json`, checked against sentencepiece itself;
- `internlm2_check`: an independent reference forward of the original InternLM2 weights, and the
  logits check every conversion must pass before its folder is published.

Nothing here imports the rest of the workbench beyond its leaves (config, io, prompt), so that
`workbench.models` can convert on first load without an import cycle.
"""


class ConversionError(ValueError):
    """A folder cannot be converted, or its conversion failed its check; the message says which file and why."""
