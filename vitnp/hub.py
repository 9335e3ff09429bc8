"""Model names: what a name means, and name -> local directory holding config.json, model.safetensors and
preprocessor_config.json.  Every entry point (the library, the CLI, the server, Ray) resolves names here.

Three kinds of names, never confused with each other:
  "bundled:<name>"   a model shipped inside the vitnp package (works with no network),
  an existing directory,
  a Hugging Face Hub repo id ("org/name"), fetched once through huggingface_hub's cache.
A name that comes from a URL (a server request) is only ever a bundled:<name> or a Hub id, never a path.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import HubUnreachableError, ModelNotCachedError, ModelNotFoundError, OfflineError

BUNDLED_PREFIX = "bundled:"
BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
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


log = logging.getLogger("vitnp.hub")


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


def split_named_model(arg: str) -> tuple[str | None, str]:
    """'NAME=MODEL' -> (NAME, MODEL); a plain MODEL -> (None, MODEL). NAME must be a valid Hub id."""
    name, sep, spec = arg.partition("=")
    if sep and name and spec and is_hub_id(name) and not os.path.exists(arg):
        return name, spec
    return None, arg


def served_names(spec: str, alias: str | None = None) -> tuple[str, tuple[str, ...]]:
    """Canonical name + aliases under which a model named on the command line answers.

    A hub id or bundled name is its own name. A directory answers to NAME (from --model NAME=DIR) and to its
    directory name, when that is a valid Hub id, so that every name can appear in /models/<name>. A
    directory with neither keeps its path as its name: reachable through POST / when it is the default.
    """
    candidates: list[str] = []
    if alias:
        candidates.append(alias)
    if spec.startswith(BUNDLED_PREFIX) or (is_hub_id(spec) and not os.path.isdir(spec)):
        candidates.append(spec)
    else:
        base = os.path.basename(os.path.normpath(spec))
        if is_hub_id(base):
            candidates.append(base)
    if not candidates:
        candidates.append(spec)
    unique = list(dict.fromkeys(candidates))
    return unique[0], tuple(unique[1:])


def check_url_name(name: str) -> None:
    """A model name from a URL must be a valid Hub id or bundled:<name>; anything else is unknown."""
    if name.startswith(BUNDLED_PREFIX):
        if BUNDLED_NAME.fullmatch(name[len(BUNDLED_PREFIX):]) and ".." not in name:
            return
        raise ModelNotFoundError(f"Model {name} does not exist")
    if not is_hub_id(name):
        raise ModelNotFoundError(f"Model {name} does not exist (not a valid Hugging Face Hub model id)")


def lookup_url_model(name: str, revision: str | None = None, timeout: float = 10.0) -> bool:
    """Where a URL's model name can be loaded from: True from the local cache (a bundled model, or a Hub repo
    whose config.json huggingface_hub's cache holds), False from the Hub (one HEAD request of at most
    `timeout` seconds, no retries).  Raises, each with its own message:
      ModelNotFoundError   no such bundled model / Hub repository / revision, a gated repo, or no config.json
      ModelNotCachedError  huggingface_hub is in offline mode (HF_HUB_OFFLINE) and the cache lacks the model
      HubUnreachableError  the Hub did not answer (no network, DNS, timeout, a 5xx)
    """
    if name.startswith(BUNDLED_PREFIX):
        if name not in bundled_models():
            raise ModelNotFoundError(f"Model {name} does not exist; bundled models: "
                                     f"{', '.join(bundled_models()) or 'none'}")
        return True
    from huggingface_hub import constants, get_hf_file_metadata, hf_hub_url, try_to_load_from_cache
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    if isinstance(try_to_load_from_cache(name, "config.json", revision=revision), str):
        return True
    if constants.HF_HUB_OFFLINE:
        raise ModelNotCachedError(f"Model {name} is not in this server's Hugging Face cache, and the server runs "
                                  "offline (HF_HUB_OFFLINE), so it cannot fetch it")
    try:
        get_hf_file_metadata(hf_hub_url(name, "config.json", revision=revision), timeout=timeout)
    except GatedRepoError:
        raise ModelNotFoundError(f"Model {name} is gated on the Hugging Face Hub; this server cannot load it") from None
    except RepositoryNotFoundError:
        raise ModelNotFoundError(f"Model {name} does not exist on the Hugging Face Hub") from None
    except RevisionNotFoundError:
        raise ModelNotFoundError(f"Model {name} has no revision {revision!r} on the Hugging Face Hub") from None
    except EntryNotFoundError:
        raise ModelNotFoundError(f"Model {name} has no config.json, so it is not a model this server can "
                                 "load") from None
    except HfHubHTTPError as e:
        status = getattr(getattr(e, "response", None), "status_code", None)
        if status is not None and status < 500:
            log.info("Hub lookup of %s failed: %s", name, e)
            raise ModelNotFoundError(f"Model {name} does not exist on the Hugging Face Hub") from None
        raise HubUnreachableError(f"Model {name} is not in this server's cache and the Hugging Face Hub did not "
                                  f"answer its lookup (HTTP {status})") from None
    except Exception as e:  # noqa: BLE001 - the HTTP client's connection errors and timeouts, whatever its kind
        log.info("Hub lookup of %s failed: %s", name, e)
        why = (f"did not answer within {timeout:g} seconds" if "timeout" in type(e).__name__.lower()
               else f"could not be reached ({type(e).__name__}: {e})")
        raise HubUnreachableError(f"Model {name} is not in this server's cache and the Hugging Face Hub "
                                  f"{why}") from None
    return False


def url_revision(name: str, revision: str | None) -> str | None:
    """The revision a URL's model is loaded at: the server's --revision for Hub ids; bundled models have none."""
    return None if name.startswith(BUNDLED_PREFIX) else revision


def check_not_a_path(name: str) -> None:
    """locate() reads an existing directory before trying the Hub; a URL's name must never pick a path."""
    if not name.startswith(BUNDLED_PREFIX) and os.path.lexists(name):
        raise ModelNotFoundError(f"{name!r} names a local path, which a URL may not load")


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
