"""Where `from_pretrained` finds weights: a local file, a local folder, or a Hugging Face Hub repo.

    resolve("addp.safetensors")                                 # a local file
    resolve("out/pipe")                                          # a save_pretrained folder
    resolve("Changyao/ADDP", filename="addp-vit-base-16.pth")    # one file of a Hub repo
    resolve("org/addp-digits")                                   # a save_pretrained folder on the Hub

Hub files go through huggingface_hub's own cache (`HF_HUB_CACHE` / `HF_HOME`), so
`HF_HUB_OFFLINE=1` and a pre-filled cache work as they do for every Hub library. A file that
is neither here nor on the Hub is one `CheckpointError` line naming the repo and the file.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

from ..errors import CheckpointError, first_line
from .weights_io import member

# The index file of a save_pretrained folder (diffusers' name): it names the components.
MODEL_INDEX = "model_index.json"

# A Hub repo id: "name" or "owner/name" (letters, digits, "-", "_", "."); a local path that
# does not exist but looks like one is looked up on the Hub.
_REPO_ID = re.compile(r"^(?:\w[\w.-]*/)?\w[\w.-]*$")
_WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin")
# The files of a save_pretrained folder; a snapshot without `filename` fetches only these.
_FOLDER_FILES = [MODEL_INDEX, "*/config.json", "*/model.safetensors"]


def resolve(name_or_path: str | os.PathLike, filename: str | None = None, revision: str | None = None,
            cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
            token: str | bool | None = None) -> Path:
    """The local file or folder that `name_or_path` (and `filename` inside it) names.

    A local path wins over a Hub repo of the same name. For a Hub repo, `filename` picks one
    file (e.g. the official ``addp-vit-base-16.pth``); without it the repo must hold a
    save_pretrained folder (``model_index.json``). `revision` is a branch, tag or commit;
    `token` a Hub access token (default: huggingface_hub's login).
    """
    check_name(name_or_path)
    if filename is not None and not isinstance(filename, str):
        raise CheckpointError(f"filename must be a string, got {_shown(filename)}")
    local = Path(name_or_path)
    if filename is not None:
        member(name_or_path, filename, "filename")  # no `..` or absolute path, locally or on the Hub
    if local.exists():
        if filename is None:
            return local
        if not local.is_dir():
            raise CheckpointError(f"{local} is a file; filename={filename!r} needs a folder or a Hub repo")
        if not (local / filename).exists():
            raise CheckpointError(f"checkpoint not found: {local / filename}")
        return local / filename
    repo = str(name_or_path)
    if repo.endswith(_WEIGHT_SUFFIXES) or not _REPO_ID.match(repo) or ".." in repo:
        raise CheckpointError(f"checkpoint not found: {repo}")
    return _from_hub(repo, filename, revision, cache_dir, local_files_only, token)


def check_name(name_or_path) -> None:
    """Refuse what cannot name a checkpoint (None, a number, a tensor, an empty string)."""
    if not isinstance(name_or_path, (str, os.PathLike)) or not str(name_or_path):
        raise CheckpointError(f"a checkpoint is named by a path or a Hub repo id, got {_shown(name_or_path)}")


def _shown(value) -> str:
    return f"{type(value).__name__} {str(value)[:40]!r}"


def _from_hub(repo: str, filename, revision, cache_dir, local_files_only, token) -> Path:
    import huggingface_hub
    from huggingface_hub import errors

    what = f"{filename} from the Hub repo {repo}" if filename else f"the Hub repo {repo}"
    at = f" at revision {revision}" if revision else ""
    hub_log = logging.getLogger("huggingface_hub")
    level = hub_log.level
    hub_log.setLevel(logging.ERROR)  # its warning on an unreachable Hub repeats what the error below says
    try:
        if filename is not None:
            return Path(huggingface_hub.hf_hub_download(repo, filename, revision=revision, cache_dir=cache_dir,
                                                        local_files_only=local_files_only, token=token))
        folder = Path(huggingface_hub.snapshot_download(repo, revision=revision, cache_dir=cache_dir,
                                                        allow_patterns=_FOLDER_FILES, token=token,
                                                        local_files_only=local_files_only))
    except errors.LocalEntryNotFoundError:
        offline = " (HF_HUB_OFFLINE is set)" if huggingface_hub.constants.HF_HUB_OFFLINE else ""
        raise CheckpointError(f"cannot get {what}{at}: it is not in the Hub cache and the Hub cannot be "
                              f"reached{offline}") from None
    except errors.RepositoryNotFoundError:
        raise CheckpointError(f"cannot get {what}{at}: no such repo (or it is private), and no local path "
                              f"of that name") from None
    except errors.RevisionNotFoundError:
        raise CheckpointError(f"cannot get {what}: no revision {revision}") from None
    except errors.EntryNotFoundError:
        raise CheckpointError(f"cannot get {what}{at}: the repo has no such file") from None
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot get {what}{at}: {first_line(e, 200)}") from None
    finally:
        hub_log.setLevel(level)
    if not (folder / MODEL_INDEX).exists():
        raise CheckpointError(f"the Hub repo {repo}{at} holds no {MODEL_INDEX}; pass filename= to load one "
                              "of its files (e.g. filename='addp-vit-base-16.pth')")
    return folder




def upload(folder: str | os.PathLike, repo_id: str | None = None, token: str | bool | None = None,
           private: bool | None = None, commit_message: str | None = None, create_pr: bool = False) -> str:
    """Upload a save_pretrained folder to the Hub repo `repo_id` (default: the folder's name),
    creating the repo when it does not exist; returns the commit's URL."""
    import huggingface_hub
    from huggingface_hub import errors

    repo_id = repo_id or Path(folder).resolve().name
    try:
        huggingface_hub.create_repo(repo_id, token=token, private=private, exist_ok=True)
        commit = huggingface_hub.upload_folder(repo_id=repo_id, folder_path=str(folder), token=token,
                                               commit_message=commit_message or "Upload an ADDP pipeline",
                                               create_pr=create_pr)
    except (errors.HfHubHTTPError, errors.HFValidationError, OSError, ValueError) as e:
        raise CheckpointError(f"cannot upload {folder} to the Hub repo {repo_id}: {first_line(e, 200)}") from None
    return str(commit)
