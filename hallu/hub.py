"""What ``--model`` names, turned into folders on this machine: a local folder, a Hub id, or a PEFT adapter.

* a local folder is used as it is;
* a Hub id (``org/name``) is looked up in the Hugging Face cache (``HF_HUB_CACHE``, else ``HF_HOME/hub``,
  else ``~/.cache/huggingface/hub``) and downloaded into it when the Hub can be reached; with
  ``HF_HUB_OFFLINE=1`` only a cached snapshot is used;
* a folder (or Hub id) holding ``adapter_config.json`` is a PEFT adapter: its base model
  (``base_model_name_or_path``, itself a folder or a Hub id) is resolved the same way.

Only small JSON files are read here and the only heavy import is ``huggingface_hub`` (no torch), so a
wrong ``--model`` fails in well under a second, before a stage takes its lock.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from hallu.errors import HalluError

# "name" or "org/name": letters, digits, '-', '_', '.'; what the Hub accepts as a model id.
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")
# What a model needs from its repository; the rest (other weight formats, images, READMEs) is skipped.
_MODEL_FILES = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken"]


@dataclass
class ModelSource:
    """A resolved ``--model``: the folder to load, its config, and for an adapter the adapter folder."""

    spec: str  # what the user passed
    path: Path  # the folder holding config.json and the weights (an adapter's base)
    config: dict
    adapter: Path | None = None  # the PEFT adapter folder, when --model names one
    base_spec: str | None = None  # the adapter's base_model_name_or_path

    def fingerprint(self) -> str:
        """Digest of what computes the outputs: the model folder, and for an adapter base + adapter."""
        from hallu.fileio import sha256_bytes
        from hallu.manifest import dir_fingerprint

        if self.adapter is None:
            return dir_fingerprint(self.path)
        both = f"base:{dir_fingerprint(self.path)}\nadapter:{dir_fingerprint(self.adapter)}"
        return sha256_bytes(both.encode())

    def folders(self) -> dict[str, Path]:
        """The folders a stage records as inputs (so a changed base or adapter makes it stale)."""
        if self.adapter is None:
            return {"model": self.path}
        return {"model": self.adapter, "base_model": self.path}

    def recorded(self) -> dict:
        rec: dict = {"path": self.spec, "resolved": str(self.path)}
        if self.adapter is not None:
            rec.update(adapter=str(self.adapter), base=self.base_spec)
        return rec


def hub_cache_dir() -> Path:
    """The Hugging Face cache as the environment says *now* (huggingface_hub reads it once, at import)."""
    env = os.environ
    if env.get("HF_HUB_CACHE"):
        return Path(env["HF_HUB_CACHE"]).expanduser()
    if env.get("HF_HOME"):
        return Path(env["HF_HOME"]).expanduser() / "hub"
    return Path("~/.cache/huggingface/hub").expanduser()


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.match(spec)) and ".." not in spec and not spec.endswith(".")


def resolve_model(spec: str | os.PathLike, *, trust_remote_code: bool = False, download: bool = False,
                  what: str = "--model") -> ModelSource:
    """Resolve ``spec`` to local folders; ``download`` fetches the whole model (else config files only)."""
    spec = str(spec)
    folder = _folder(spec, trust_remote_code, download, what)
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.is_file():
        cfg = _read_json_object(adapter_cfg)
        base_spec = cfg.get("base_model_name_or_path")
        if not isinstance(base_spec, str) or not base_spec:
            raise HalluError(f"{adapter_cfg}: no base_model_name_or_path, so the adapter's base model is unknown")
        base_folder = _adapter_base(base_spec, folder, trust_remote_code, download, what)
        return ModelSource(spec, base_folder, read_config(base_folder, f"{what} {spec}: its base model"),
                           adapter=folder, base_spec=base_spec)
    return ModelSource(spec, folder, read_config(folder, f"{what} {spec}"))


def read_config(folder: Path, where: str) -> dict:
    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        # A Hub id or an adapter's base names another folder than the one the user typed: say which.
        at = "" if where.endswith(str(folder)) else f" in {folder}"
        raise HalluError(f"{where}: no config.json{at}, so this is not a model folder")
    return _read_json_object(cfg_path)


def _read_json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HalluError(f"{path}: not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise HalluError(f"{path}: expected a JSON object, found {type(value).__name__}")
    return value


def _folder(spec: str, trust_remote_code: bool, download: bool, what: str) -> Path:
    p = Path(spec).expanduser()
    if p.is_dir():
        return p
    if p.exists():
        raise HalluError(f"{what} {spec}: is a file; expected a model folder (config.json, weights, processor)")
    if not looks_like_repo_id(spec):
        raise HalluError(f"{what} {spec}: no such folder")
    return _from_hub(spec, trust_remote_code, download, what)


def _adapter_base(base_spec: str, adapter: Path, trust_remote_code: bool, download: bool, what: str) -> Path:
    """The base as written in adapter_config.json: a path (as given, or relative to the adapter) or a Hub id."""
    for candidate in (Path(base_spec).expanduser(), adapter / base_spec):
        if candidate.is_dir():
            return candidate
    where = f"{what} {adapter}: the adapter's base model {base_spec!r} (base_model_name_or_path)"
    if not looks_like_repo_id(base_spec):
        raise HalluError(f"{where} is not a folder on this machine")
    try:
        return _from_hub(base_spec, trust_remote_code, download, what)
    except HalluError as e:
        raise HalluError(f"{where}: {e}") from e


def _from_hub(repo_id: str, trust_remote_code: bool, download: bool, what: str) -> Path:
    """The cached snapshot of ``repo_id``; fetched (config files only, or all with ``download``) when online."""
    from huggingface_hub import hf_hub_download, snapshot_download
    from huggingface_hub.errors import EntryNotFoundError, GatedRepoError, RepositoryNotFoundError

    cache = hub_cache_dir()
    offline = hub_offline()
    where = f"{what} {repo_id}"
    try:
        if offline or not download:
            # The cache first: a cached id needs no network, even when online.
            try:
                return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
            except (OSError, EntryNotFoundError):
                if offline:
                    raise
            for name in ("config.json", "adapter_config.json"):  # enough to check what it is
                try:
                    return Path(hf_hub_download(repo_id, name, cache_dir=cache)).parent
                except EntryNotFoundError:
                    continue
            raise HalluError(f"{where}: the Hub repository has neither config.json nor adapter_config.json")
        patterns = _MODEL_FILES + (["*.py"] if trust_remote_code else [])
        folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns))
        if not any(folder.glob("*.safetensors")) and not (folder / "adapter_config.json").is_file():
            folder = Path(snapshot_download(repo_id, cache_dir=cache, allow_patterns=patterns + ["*.bin"]))
        return folder
    except GatedRepoError as e:
        raise HalluError(f"{where}: the model is gated; accept its terms on the Hub and log in "
                         f"(hf auth login) ({first_line(e)})") from e
    except RepositoryNotFoundError as e:
        raise HalluError(f"{where}: not a local folder, and no such model on the Hub (a private one needs "
                         f"hf auth login)") from e
    except (OSError, EntryNotFoundError) as e:
        if offline:
            raise HalluError(f"{where}: not a local folder, and not in the Hugging Face cache ({cache}); "
                             "HF_HUB_OFFLINE=1, so it cannot be downloaded") from e
        raise HalluError(f"{where}: not a local folder, and it could not be fetched from the Hub "
                         f"({first_line(e)})") from e


def first_line(e: BaseException) -> str:
    text = str(e).strip()
    return next((line.strip() for line in text.splitlines() if line.strip()), type(e).__name__)
