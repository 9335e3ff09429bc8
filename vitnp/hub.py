"""Model name -> local directory holding config.json, model.safetensors and preprocessor_config.json.

Three kinds of names, never confused with each other:
  "bundled:<name>"   a model shipped inside the vitnp package (works with no network),
  an existing directory,
  a Hugging Face Hub repo id ("org/name"), fetched once through huggingface_hub's cache.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .errors import ModelNotFoundError, OfflineError

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
# Only what the engine reads: never pytorch_model.bin, tf/flax weights or tokenizer files.
HUB_FILES = [
    "config.json",
    "preprocessor_config.json",
    "model.safetensors",
    "model.safetensors.index.json",
    "model-*-of-*.safetensors",
]
OFFLINE_HINT = (
    "To proceed: connect to the internet once so the model is cached, or pass the path of a directory that "
    "holds config.json + model.safetensors, or try the bundled offline model: "
    "vitnp classify --model bundled:digits examples/digits/"
)


@dataclass(frozen=True)
class ModelLocation:
    path: Path
    model_id: str
    revision: str | None


def bundled_models() -> list[str]:
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(BUNDLED_PREFIX + p.name for p in BUNDLED_DIR.iterdir() if (p / "config.json").is_file())


def is_hub_id(name: str) -> bool:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def locate(model: str | os.PathLike, revision: str | None = None, token: str | bool | None = None,
           cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
           progress: bool = True) -> ModelLocation:
    if isinstance(model, os.PathLike):
        model = os.fspath(model)
    if not isinstance(model, str) or not model:
        raise ModelNotFoundError(f"model must be a hub id, a directory or a bundled:<name>, got {model!r}")
    if model.startswith(BUNDLED_PREFIX):
        path = BUNDLED_DIR / model[len(BUNDLED_PREFIX):]
        if model not in bundled_models():
            raise ModelNotFoundError(
                f"no bundled model {model!r}; bundled models: {', '.join(bundled_models()) or 'none'}"
            )
        return ModelLocation(path, model, None)
    if os.path.isdir(model):
        if not os.path.isfile(os.path.join(model, "config.json")):
            raise ModelNotFoundError(
                f"{model!r} is a directory but not a model: it has no config.json (a model directory holds "
                "config.json, model.safetensors and preprocessor_config.json, as save_pretrained writes them)"
            )
        return ModelLocation(Path(model), model, None)
    if not is_hub_id(model):
        raise ModelNotFoundError(
            f"{model!r} is neither an existing directory nor a valid Hugging Face Hub id (like "
            f"'google/vit-base-patch16-224'); bundled models: {', '.join(bundled_models()) or 'none'}"
        )
    return ModelLocation(
        _download(model, revision, token, cache_dir, local_files_only, progress), model, revision
    )


def _download(repo_id, revision, token, cache_dir, local_files_only, progress) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    kwargs = dict(repo_id=repo_id, revision=revision, token=token, cache_dir=cache_dir,
                  allow_patterns=HUB_FILES)
    if local_files_only is not None:
        kwargs["local_files_only"] = local_files_only
    if not progress:
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()
    try:
        return Path(snapshot_download(**kwargs))
    except GatedRepoError:
        raise ModelNotFoundError(
            f"{repo_id} is a gated model: accept its terms on the Hub and pass a token (token= / --token / HF_TOKEN)"
        ) from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(
            f"model {repo_id!r} was not found on the Hugging Face Hub (if it is private, pass a token)"
        ) from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"model {repo_id!r} has no revision {revision!r}") from None
    except (LocalEntryNotFoundError, OfflineModeIsEnabled, ConnectionError):
        from huggingface_hub import constants

        where = cache_dir or constants.HF_HUB_CACHE
        raise OfflineError(
            f"cannot fetch {repo_id!r}: the Hugging Face Hub is unreachable (or offline mode is on) and the model is "
            f"not in {where}. {OFFLINE_HINT}"
        ) from None
    except HfHubHTTPError as e:
        raise OfflineError(f"cannot fetch {repo_id!r} from the Hugging Face Hub: {e}. {OFFLINE_HINT}") from None
