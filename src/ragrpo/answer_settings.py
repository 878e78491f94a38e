"""The retrieval and prompt settings a model answers with, kept beside a from-index run's merged model.

A model trained from an index learned to answer one kind of prompt: k passages found by one search
mode, headed one way, with or without the citation and reasoning instructions. `train --from-index`
writes those settings to `merged/ragrpo.json`; `ask` and `serve` read them when given that model, so
that a plain `ragrpo ask "..." --model runs/rag/merged` retrieves and prompts as the run trained. An
explicit option wins, and a notice says where it departs from the training. Models without the file
(the packaged base, a run on a plain dataset) answer with the defaults below.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ragrpo import RagrpoError

FILE = "ragrpo.json"
# where a from-index run keeps them until its merged model exists (a killed run has no merged/ folder)
RUN_FILE = "curriculum/answer_settings.json"


@dataclass(frozen=True)
class AnswerSettings:
    mode: str = "vector"
    k: int = 5
    cite: bool = False
    reasoning: bool = False
    header: str | None = None  # passage header template; None: from the table's columns

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def saved_settings(model: str | Path | None) -> AnswerSettings | None:
    """The settings saved beside `model` (a folder), or None when it has none."""
    if model is None or not (Path(model) / FILE).is_file():
        return None
    try:
        record = json.loads((Path(model) / FILE).read_text())
        return AnswerSettings(**{f.name: record[f.name] for f in fields(AnswerSettings) if f.name in record})
    except (ValueError, TypeError) as exc:
        raise RagrpoError(f"{Path(model) / FILE} is not a valid settings file ({exc}); delete it or retrain") from None


def resolve_settings(model: str | Path | None, **given) -> tuple[AnswerSettings, list[str]]:
    """The settings to answer with: each option given (not None) wins over the model's saved settings,
    which win over the defaults. Also a notice for every given option that departs from the saved ones."""
    saved = saved_settings(model)
    base = saved or AnswerSettings()
    chosen = {f.name: given[f.name] if given.get(f.name) is not None else getattr(base, f.name)
              for f in fields(AnswerSettings)}
    notices = []
    if saved is not None:
        for name, value in given.items():
            if value is not None and value != getattr(saved, name):
                notices.append(f"note: {model} was trained with {name}={getattr(saved, name)!r}; answering with "
                               f"{name}={value!r}")
    return AnswerSettings(**chosen), notices
